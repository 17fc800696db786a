"""Fleet operations deployed: the report in a real browser (headless
Chromium: the rendered DOM and a screenshot), the standalone server's
read-only administrator pages, and a hunt across hundreds of clients
through nginx in front of two servers sharing one BaseDirectory, one of
them killed mid-hunt."""

import base64
import html.parser
import http.client
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import zlib

import pytest

import nph_webjob
from conftest import (LOOPBACK, NGINX, NPH_WEBJOB, WEBJOB, free_port,
                      queue_exchange, queue_query, run_simulated_clients,
                      stop_process, wait_for_port, write_file)

CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
VERSION = 'webjob+1.0.0+ssl+dsv+64+bit'
SYSTEM = 'x86_64+Linux+6.18.0-1-amd64'
HOSTILE = (b'<script>document.title="owned"</script><img src=x onerror='
           b'"document.title=1"><b>bold?</b>\x1b[31mred\x1b[0m \xff\xfe\xc3'
           b' \xe2\x80\xae reversed\n')
HUNT_CLIENTS = 300          # the figure, simulated clients in CI
REAL_CLIENTS = 3            # webjob.py processes among them


# Chromium ####################################################################

def chromium(tmp_path, url, *args):
    """Headless Chromium on url; its stdout (e.g. the DOM for --dump-dom)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail('chromium is not installed (apt-get install chromium)')
    profile = tmp_path / 'chromium-profile'
    profile.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu',
         '--no-first-run', '--user-data-dir=%s' % profile] + list(args) +
        [url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, 'chromium exited %s' % proc.returncode
    return out.decode('utf-8')


class Dom(html.parser.HTMLParser):
    """What a rendered page holds: each element's tag and attributes, the
    text of <pre> blocks, the title."""

    def __init__(self, text):
        html.parser.HTMLParser.__init__(self, convert_charrefs=True)
        self.elements, self.pres, self.title = [], [], ''
        self.stack = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self.stack.append(tag)
        if tag == 'pre':
            self.pres.append('')

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        if 'pre' in self.stack:
            self.pres[-1] += data
        if self.stack[-1:] == ['title']:
            self.title += data

    def tags(self, name):
        return [attrs for tag, attrs in self.elements if tag == name]


def png_pixels(path):
    """(width, height, rows of (r, g, b)) of an 8-bit RGB/RGBA PNG."""
    with open(str(path), 'rb') as handle:
        data = handle.read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    offset, chunks, header = 8, [], None
    while offset < len(data):
        length, kind = struct.unpack('>I4s', data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        if kind == b'IHDR':
            header = struct.unpack('>IIBBBBB', body)
        elif kind == b'IDAT':
            chunks.append(body)
        offset += 12 + length
    width, height, depth, color = header[:4]
    assert depth == 8 and color in (2, 6), header
    step = 3 if color == 2 else 4
    raw = zlib.decompress(b''.join(chunks))
    stride = width * step
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - step] if x >= step else 0
            up = previous[x]
            corner = previous[x - step] if x >= step else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif kind == 4:
                guess = left + up - corner
                pa, pb, pc = abs(guess - left), abs(guess - up), \
                    abs(guess - corner)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else
                                      up if pb <= pc else corner)) & 255
        rows.append([tuple(line[x:x + 3]) for x in range(0, stride, step)])
        previous = line
    return width, height, rows


def put(root, client, program, out, err, status, jid):
    """Store one upload in-process, as a PUT would."""
    env = ('Version=webjob 1.0.0\nClientId=%s\nJid=%s\nKidStatus=%s\n'
           'GetError=NA\nRunError=NA\nHashType=MD5\n' % (client, jid, status)
           ).encode()
    site = nph_webjob.load_site(None, overrides={
        'BaseDirectory': str(root), 'RequireUser': False})
    query = ('VERSION=%s&SYSTEM=%s&CLIENTID=%s&FILENAME=%s&RUNTYPE=snapshot'
             '&STDOUT_LENGTH=%d&STDERR_LENGTH=%d&STDENV_LENGTH=%d' % (
                 VERSION, SYSTEM, client, program, len(out), len(err),
                 len(env)))
    import io
    exchange = nph_webjob.process_request(
        {'REQUEST_METHOD': 'PUT', 'QUERY_STRING': query,
         'CONTENT_LENGTH': str(len(out) + len(err) + len(env)),
         'HTTP_JOB_ID': jid}, io.BytesIO(out + err + env), site)
    assert exchange.status == 200, exchange.message
    nph_webjob.log_exchange(exchange, site)
    return exchange.group


@pytest.fixture
def locker(server_root):
    """A locker with a good job, a failed one with hostile output, a 10 MB
    line and a hunt."""
    good = put(server_root, 'client_1', 'hostname.sh', b'fine\n', b'', 0,
               'jid_good')
    bad = put(server_root, 'client_1', 'hostname.sh', HOSTILE, HOSTILE, 7,
              'jid_bad')
    big = put(server_root, 'client_1', 'hostname.sh',
              b'A' * (10 << 20) + b'\n', b'', 0, 'jid_big')
    os.makedirs(str(server_root / 'profiles/client_2'))
    proc = subprocess.Popen([sys.executable, NPH_WEBJOB, 'hunt', 'start',
                             'case_7', '--command', 'hostname.sh',
                             '--pattern', 'client_*', '--root',
                             str(server_root)], stdout=subprocess.PIPE)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    return server_root, good, bad, big


def test_html_report_renders_hostile_uploads_as_inert_text(locker, tmp_path):
    root, good, bad, big = locker
    page = tmp_path / 'report.html'
    proc = subprocess.Popen([sys.executable, NPH_WEBJOB, 'report', '--root',
                             str(root), '--html', str(page)],
                            stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=120) == 1          # there is a failure
    dom = Dom(chromium(tmp_path, page.as_uri(), '--dump-dom'))
    assert dom.title == 'WebJob locker report'
    assert dom.tags('script') == [] and [a for a in dom.tags('img')] == []
    assert [t for t, a in dom.elements if t == 'b'] == []
    shown = ('<script>document.title="owned"</script><img src=x onerror='
             '"document.title=1"><b>bold?</b>\\x1b[31mred\\x1b[0m '
             '\\xff\\xfe\\xc3 \\u202e reversed\n')
    assert dom.pres.count(shown) == 2           # .out and .err of the bad job
    rows = [a.get('class') for a in dom.tags('tr') if a.get('class')]
    assert rows == ['job ok', 'job failed', 'job ok']
    checks = [a.get('class') for a in dom.tags('span')
              if a.get('class') in ('match', 'mismatch', 'unchecked')]
    assert checks == ['unchecked'] * 3      # no StdOutHash was declared
    assert 'A' * (1 << 16) in dom.pres and 'A' * ((1 << 16) + 1) not in ''.join(
        dom.pres)
    links = dict((a['download'], a['href']) for a in dom.tags('a')
                 if 'download' in a)
    assert base64.b64decode(links[bad + '.out'].split(',', 1)[1]) == HOSTILE
    assert big + '.out' not in links            # 10 MB: named, not embedded


def test_html_report_screenshot_shows_status_colours(locker, tmp_path):
    root, good, bad, big = locker
    page = tmp_path / 'report.html'
    subprocess.Popen([sys.executable, NPH_WEBJOB, 'report', '--root',
                      str(root), '--html', str(page)],
                     stdout=subprocess.DEVNULL).wait(timeout=120)
    shot = tmp_path / 'shot.png'
    chromium(tmp_path, page.as_uri(), '--window-size=1000,1400',
             '--hide-scrollbars', '--screenshot=%s' % shot)
    width, height, rows = png_pixels(shot)
    assert (width, height) == (1000, 1400)
    counts = {}
    for row in rows:
        for pixel in row:
            counts[pixel] = counts.get(pixel, 0) + 1
    ok, failed, neutral = (0xc8, 0xf0, 0xc8), (0xf6, 0xc0, 0xc0), \
        (0xdd, 0xdd, 0xdd)
    assert counts.get(ok, 0) > 2000         # the two good rows, green
    assert counts.get(failed, 0) > 1000     # the failed row, red
    assert counts.get(neutral, 0) > 200     # the hunt's never-seen clients


# Administrator pages #########################################################

def htpasswd(path, users):
    with open(str(path), 'w') as handle:
        for user, password in users:
            salt = 'abcdefgh'
            handle.write('%s:%s\n' % (user, crypt_sha512(password, salt)))


def crypt_sha512(password, salt):
    out = subprocess.check_output(['openssl', 'passwd', '-6', '-salt', salt,
                                   password])
    return out.decode().strip()


def fetch(port, path, user=None, method='GET'):
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
    headers = {}
    if user:
        headers['Authorization'] = 'Basic ' + base64.b64encode(
            ('%s:%s' % user).encode()).decode()
    conn.request(method, path, headers=headers)
    reply = conn.getresponse()
    body = reply.read()
    conn.close()
    return reply.status, dict(reply.getheaders()), body


@pytest.fixture
def admin_server(locker, standalone_server, tmp_path):
    root = locker[0]
    users = tmp_path / 'htpasswd'
    htpasswd(users, [('admin', 'pw-admin'), ('client_1', 'pw-client')])
    server = standalone_server(root=str(root), args=[
        '--htpasswd', str(users), '--admin', 'admin'])
    return server, locker


def test_admin_pages_need_an_administrator(admin_server):
    server, locker = admin_server
    assert fetch(server.port, '/webjob-admin/')[0] == 401
    assert fetch(server.port, '/webjob-admin/',
                 ('client_1', 'pw-client'))[0] == 401
    assert fetch(server.port, '/webjob-admin/', ('admin', 'wrong'))[0] == 401
    status, headers, body = fetch(server.port, '/webjob-admin/',
                                  ('admin', 'pw-admin'))
    assert status == 200
    assert headers['Content-Type'] == 'text/html; charset=utf-8'
    assert "default-src 'none'" in headers['Content-Security-Policy']
    assert headers['X-Content-Type-Options'] == 'nosniff'
    assert b'<h1>WebJob locker report</h1>' in body
    lines = server.log_lines(3 + 4)         # the locker's 3 PUTs, then ours
    admin, = [line for line in lines if line.endswith(' for admin')]
    assert admin.endswith(' 200 -- Administrator page (/webjob-admin/) for '
                          'admin')


def test_admin_pages_change_nothing(admin_server):
    server, (root, good, bad, big) = admin_server
    before = sorted(os.listdir(str(root / 'incoming')))
    for method in ('POST', 'PUT', 'DELETE'):
        status, headers, body = fetch(server.port, '/webjob-admin/files/' +
                                      bad + '.out', ('admin', 'pw-admin'),
                                      method)
        assert (status, headers.get('Allow')) == (405, 'GET, HEAD')
    assert sorted(os.listdir(str(root / 'incoming'))) == before


def test_admin_pages_serve_uploads_as_downloads_only(admin_server):
    server, (root, good, bad, big) = admin_server
    status, headers, body = fetch(server.port, '/webjob-admin/files/' + bad +
                                  '.out', ('admin', 'pw-admin'))
    assert (status, body) == (200, HOSTILE)
    assert headers['Content-Type'] == 'application/octet-stream'
    assert headers['Content-Disposition'] == 'attachment; filename="%s.out"' \
        % bad
    for path in ('files/../logfiles/nph-webjob.log', 'files/.lock',
                 'files/%2e%2e%2fetc%2fpasswd', 'files/x.sh', 'other'):
        assert fetch(server.port, '/webjob-admin/' + path,
                     ('admin', 'pw-admin'))[0] == 404, path


def test_admin_page_in_chromium_shows_the_report_inertly(admin_server,
                                                         tmp_path):
    server, (root, good, bad, big) = admin_server
    dom = Dom(chromium(tmp_path, 'http://admin:pw-admin@%s:%d/webjob-admin/'
                       % (LOOPBACK, server.port), '--dump-dom'))
    assert dom.title == 'WebJob locker report'
    assert dom.tags('script') == []
    links = [a['href'] for a in dom.tags('a') if 'download' in a]
    assert '/webjob-admin/files/%s.out' % bad in links
    assert '/webjob-admin/files/%s.out' % big in links


def test_serve_refuses_admin_pages_without_authentication(tmp_path):
    proc = subprocess.Popen([sys.executable, NPH_WEBJOB, 'serve', '--root',
                             str(tmp_path / 'r'), '--admin', 'admin',
                             '--port', '0'], stderr=subprocess.PIPE)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 2
    assert err.splitlines()[0] == ('nph_webjob: --admin needs --htpasswd or '
                                   '--client-ca: the report pages are for '
                                   'named users only')


# A hunt behind nginx #########################################################

NGINX_PROXY_CONF = """\
worker_processes 1;
pid {top}/nginx.pid;
error_log {top}/nginx-error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path {top}/body;
    proxy_temp_path {top}/proxy;
    fastcgi_temp_path {top}/fastcgi;
    uwsgi_temp_path {top}/uwsgi;
    scgi_temp_path {top}/scgi;
    upstream webjob {{
        server 127.0.0.1:{a} max_fails=1 fail_timeout=2s;
        server 127.0.0.1:{b} max_fails=1 fail_timeout=2s;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://webjob;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error;
        }}
    }}
}}
"""


class Farm(object):
    """Two 'nph_webjob.py serve' on one BaseDirectory behind one nginx."""

    def __init__(self, root, scratch):
        self.root, self.scratch = str(root), scratch
        self.ports = [free_port(), free_port()]
        self.servers = [None, None]
        for n in (0, 1):
            write_file(os.path.join(scratch, 'server%d.cfg' % n), (
                'JobQueueEnable=Y\nServerId=server_%d\n' % n).encode())
            self.start(n)
        for name in ('body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'):
            os.makedirs(os.path.join(scratch, name))
            os.chmod(os.path.join(scratch, name), 0o777)
        self.port = free_port()
        conf = os.path.join(scratch, 'nginx.conf')
        with open(conf, 'w') as handle:
            handle.write(NGINX_PROXY_CONF.format(
                top=scratch, a=self.ports[0], b=self.ports[1],
                port=self.port))
        self.nginx = subprocess.Popen(
            [NGINX, '-c', conf, '-p', scratch + '/', '-e',
             os.path.join(scratch, 'nginx-error.log'), '-g', 'daemon off;'],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(LOOPBACK, self.port, proc=self.nginx)
        self.url = 'http://%s:%d/cgi-client/nph-webjob.cgi' % (LOOPBACK,
                                                               self.port)

    def start(self, n):
        err = open(os.path.join(self.scratch, 'server%d.err' % n), 'ab')
        self.servers[n] = subprocess.Popen(
            [sys.executable, NPH_WEBJOB, 'serve', '--root', self.root,
             '--port', str(self.ports[n]), '--config',
             os.path.join(self.scratch, 'server%d.cfg' % n)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            start_new_session=True)
        err.close()
        wait_for_port(LOOPBACK, self.ports[n], proc=self.servers[n])

    def kill(self, n):
        self.servers[n].kill()
        self.servers[n].wait()

    def stop(self):
        for proc in self.servers + [self.nginx]:
            if proc is not None:
                stop_process(proc)


@pytest.fixture
def farm(server_root):
    if not os.path.exists(NGINX):
        pytest.fail('nginx is not installed')
    write_file(server_root / 'profiles/common/commands/collect.sh',
               b'#!/bin/sh\necho "collected $*"\n', 0o755)
    import tempfile
    scratch = tempfile.mkdtemp(prefix='webjob-farm-')
    os.chmod(scratch, 0o755)
    farm = Farm(server_root, scratch)
    yield farm
    farm.stop()
    shutil.rmtree(scratch, ignore_errors=True)


def test_a_300_client_hunt_loses_and_doubles_nothing_through_a_kill(
        farm, tmp_path):
    clients = ['host_%03d' % n for n in range(HUNT_CLIENTS)]
    group = write_file(tmp_path / 'group', ('\n'.join(clients) + '\n')
                       .encode())
    proc = subprocess.Popen([sys.executable, NPH_WEBJOB, 'hunt', 'start',
                             'sweep', '--command', 'collect.sh', '--pin',
                             '--group', str(group), '--root', farm.root],
                            stdout=subprocess.PIPE)
    assert proc.communicate(timeout=120)[0] == (
        b'hunt sweep: collect.sh queued for 300 clients\n')
    real = clients[:REAL_CLIENTS]
    procs = []
    for client in real:
        work = tmp_path / client
        work.mkdir()
        cfg = write_file(tmp_path / (client + '.cfg'), (
            'ClientId=%s\nURLGetURL=%s\nURLPutURL=%s\nTempDirectory=%s\n' % (
                client, farm.url, farm.url, work)).encode())
        procs.append(subprocess.Popen([sys.executable, '-I', '-S', WEBJOB,
                                       '--job', '-f', str(cfg)]))
    rest = clients[REAL_CLIENTS:]
    run_simulated_clients(farm.port, rest[:150])
    assert [p.wait(timeout=120) for p in procs] == [0] * REAL_CLIENTS
    farm.kill(0)                                    # mid-hunt, no warning
    run_simulated_clients(farm.port, rest[150:225])
    farm.start(0)
    run_simulated_clients(farm.port, rest[225:])
    status = subprocess.Popen(
        [sys.executable, NPH_WEBJOB, 'hunt', 'status', 'sweep', '--root',
         farm.root], stdout=subprocess.PIPE)
    lines = status.communicate(timeout=120)[0].decode().splitlines()
    assert status.returncode == 0
    assert lines[-1] == ('hunt sweep: 300 clients: 300 done, 0 failed, 0 '
                         'running, 0 pending, 0 never-seen, 0 expired, 0 '
                         'cancelled')
    incoming = os.path.join(farm.root, 'incoming')
    ready = sorted(name for name in os.listdir(incoming)
                   if name.endswith('.rdy'))
    owner = dict((name, re.match(nph_webjob.GROUP_NAME, name[:-4]).group(
        'client')) for name in ready)
    assert sorted(owner.values()) == clients
    for name in ready:
        client = owner[name]
        record = nph_webjob.read_key_values(os.path.join(
            farm.root, 'jobqueues', client, '000001.job'))
        jid = nph_webjob.read_key_values(os.path.join(incoming, name))['Jid']
        assert record['JobIds'] == jid and record['Result'] + '.rdy' == name
    verify = subprocess.Popen([sys.executable, NPH_WEBJOB, 'verify',
                               '--root', farm.root], stdout=subprocess.PIPE)
    assert verify.communicate(timeout=120)[0].decode().splitlines()[-1] == (
        'verify: 300 groups, 1200 files in the manifest, 0 problems')


def test_two_servers_behind_nginx_hand_each_entry_out_once(farm):
    for n in range(20):
        proc = subprocess.Popen([sys.executable, NPH_WEBJOB, 'job', 'add',
                                 '--client', 'client_1', '--command',
                                 'collect.sh', '--root', farm.root],
                                stdout=subprocess.DEVNULL)
        assert proc.wait(timeout=60) == 0
    answers = []
    barrier = threading.Barrier(40)

    def racer():
        barrier.wait()
        answers.append(queue_exchange(farm.port, 'JOB', queue_query(
            'client_1', 'default'))[:2])

    threads = [threading.Thread(target=racer) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    given = [job_id for status, job_id in answers if status == 200]
    assert sorted(status for status, job_id in answers) == [200] * 20 + \
        [252] * 20
    handed = [nph_webjob.read_key_values(os.path.join(
        farm.root, 'jobqueues/client_1/%06d.job' % n))['JobIds']
        for n in range(1, 21)]
    assert sorted(handed) == sorted(given) and len(set(given)) == 20
    servers = set(job_id.rsplit('_', 2)[0] for job_id in given)
    assert servers == {'server_0', 'server_1'}      # both took part


# The CGI as the web server's user ############################################

def run_cgi_as_www(top, method, query, body=b'', job_id=None):
    """nph_webjob.py as a CGI process run as www-data: its status code."""
    import pwd
    www = pwd.getpwnam('www-data')
    env = {'GATEWAY_INTERFACE': 'CGI/1.1', 'REQUEST_METHOD': method,
           'QUERY_STRING': query, 'CONTENT_LENGTH': str(len(body)),
           'SCRIPT_FILENAME': os.path.join(top, 'nph-webjob.cgi'),
           'REMOTE_ADDR': '127.0.0.1', 'PATH': '/usr/bin:/bin',
           'WEBJOB_PROPERTIES_FILE': os.path.join(top, 'nph-webjob.cfg')}
    if job_id:
        env['HTTP_JOB_ID'] = job_id

    def demote():
        os.setgroups([])
        os.setgid(www.pw_gid)
        os.setuid(www.pw_uid)

    proc = subprocess.Popen(['/usr/bin/python3', '-I', '-S', os.path.join(
        top, 'nph_webjob.py')], env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, preexec_fn=demote)
    out = proc.communicate(body, timeout=60)[0]
    head, _, rest = out.partition(b'\r\n\r\n')
    fields = dict(line.split(': ', 1) for line in
                  head.decode('latin-1').split('\r\n')[1:])
    return int(head.split()[1]), fields.get('Job-Id')


def test_cgi_as_www_data_serves_a_queue_the_administrator_made_as_root():
    import pwd
    import tempfile
    www = pwd.getpwnam('www-data')
    top = tempfile.mkdtemp(prefix='webjob-cgi-queue-')
    try:
        os.chmod(top, 0o755)
        for name in ('webjob.py', 'nph_webjob.py'):
            shutil.copy(os.path.join(os.path.dirname(NPH_WEBJOB), name), top)
        base = os.path.join(top, 'base')
        for name in ('incoming', 'logfiles', 'jobqueues',
                     'profiles/common/commands'):
            os.makedirs(os.path.join(base, name))
        for name in ('incoming', 'logfiles', 'jobqueues'):  # the README's
            os.chown(os.path.join(base, name), www.pw_uid, www.pw_gid)
        write_file(os.path.join(base, 'profiles/common/commands/collect.sh'),
                   b'#!/bin/sh\necho collected\n', 0o755)
        write_file(os.path.join(top, 'nph-webjob.cfg'), (
            'BaseDirectory=%s\nRequireUser=N\nJobQueueEnable=Y\n' % base
        ).encode())
        proc = subprocess.Popen([sys.executable, NPH_WEBJOB, 'job', 'add',
                                 '--client', 'client_1', '--command',
                                 'collect.sh', '--root', base],
                                stdout=subprocess.DEVNULL)
        assert proc.wait(timeout=60) == 0
        status, job_id = run_cgi_as_www(top, 'JOB', queue_query(
            'client_1', 'default'))
        assert status == 200 and job_id
        env = ('KidStatus=0\nJid=%s\n' % job_id).encode()
        status, given = run_cgi_as_www(top, 'PUT', queue_query(
            'client_1', 'collect.sh', (0, 0, len(env))), env, job_id)
        assert (status, given) == (200, job_id)
        record = nph_webjob.read_key_values(os.path.join(
            base, 'jobqueues/client_1/000001.job'))
        assert record['State'] == 'done'
        assert os.stat(os.path.join(base, 'jobqueues/client_1')).st_uid == \
            www.pw_uid
    finally:
        shutil.rmtree(top, ignore_errors=True)


# Apache ######################################################################

def wait_for_log(server, text, timeout=30.0):
    """True once a line of the server's log contains text (the CGI writes
    it after its answer)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in server.log_lines()):
            return True
        time.sleep(0.05)        # poll interval while waiting on the log
    return False


def test_queued_jobs_run_through_apache_nph_cgi(apache_server, tmp_path):
    """The JOB method and the 252 answer pass Apache's mod_cgi (the NPH
    script, as the README deploys it: Apache may chunk a parsed-header
    CGI's answer, which the original's client cannot read either)."""
    from conftest import CGI_PATH
    import pwd
    server = apache_server()
    www = pwd.getpwnam('www-data')
    with open(server.properties, 'rb') as handle:
        original = handle.read()
    queues = os.path.join(server.root, 'jobqueues')
    try:
        write_file(server.properties, original + b'JobQueueEnable = Y\n')
        os.makedirs(queues)
        os.chown(queues, www.pw_uid, www.pw_gid)
        for n in range(2):
            proc = subprocess.Popen([sys.executable, NPH_WEBJOB, 'job', 'add',
                                     '--client', 'client_1', '--command',
                                     'hostname.sh', '--pin', '--root',
                                     server.root], stdout=subprocess.DEVNULL)
            assert proc.wait(timeout=60) == 0
        codes = []
        for count in (['1'], []):
            url = 'http://%s:%d%s' % (LOOPBACK, server.port, CGI_PATH)
            cfg = write_file(tmp_path / 'apache.cfg', (
                'ClientId=client_1\nURLGetURL=%s\nURLPutURL=%s\n'
                'URLAuthType=basic\nURLUsername=client_1\n'
                'URLPassword=secret-1\nTempDirectory=%s\n' % (
                    url, url, tmp_path)).encode())
            proc = subprocess.Popen([sys.executable, '-I', '-S', WEBJOB,
                                     '--job', '-f', str(cfg)] + count,
                                    stderr=subprocess.PIPE)
            codes.append((proc.wait(timeout=120), proc.stderr.read()))
        assert codes == [(0, b''), (0, b'')]
        states = [nph_webjob.read_key_values(os.path.join(
            queues, 'client_1', '%06d.job' % n))['State'] for n in (1, 2)]
        assert states == ['done', 'done']
        assert wait_for_log(server, ' JOB client_1 default 0 0 0 252 -- No '
                            'job queued')
    finally:
        write_file(server.properties, original)
        shutil.rmtree(queues, ignore_errors=True)
