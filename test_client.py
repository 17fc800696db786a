"""Tests for webjob.py alone (the client layer), in the order of its man page.

Most tests run the client as a real process against a loopback server: a
scripted raw-socket server (for the exact bytes on the wire and for broken
servers), the standalone nph_webjob.py, or real Apache (see conftest.py).
"""

import base64
import hashlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import shutil
import threading
import time
import types

import pytest

import webjob
from conftest import close_listener

HERE = os.path.dirname(os.path.abspath(__file__))
WEBJOB = os.path.join(HERE, 'webjob.py')
PROGRAM_BODY = b'#!/bin/sh\necho "hello $*"\necho "to stderr" >&2\n'
CGI_PATH = '/cgi-client/nph-webjob.cgi'


def run_webjob(args, cwd=None, stdin=None, env=None, python=None, timeout=60):
    """Run webjob.py as a real process; return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.pop('WEBJOB_DEBUG', None)
    full_env.update(env or {})
    return subprocess.run([python or sys.executable, WEBJOB] + list(args),
                          cwd=cwd, input=stdin, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout)


def assert_clean_error(result, code, *words):
    """One line on stderr, prefixed 'webjob:', no traceback, right code."""
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert 'Traceback' not in err
    assert err.startswith('webjob: '), err
    for word in words:
        assert word in err, (word, err)


# Scripted loopback server ####################################################

class Request(object):
    def __init__(self, head, body):
        self.head = head
        self.body = body
        lines = head.decode('latin-1').split('\r\n')
        self.request_line = lines[0]
        self.method, self.target, self.version = lines[0].split(' ')
        self.headers = [tuple(line.split(': ', 1)) for line in lines[1:] if line]

    def header(self, name):
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def query(self):
        return self.target.split('?', 1)[1]

    def params(self):
        import urllib.parse
        return urllib.parse.parse_qsl(self.query, keep_blank_values=True)


class ScriptedServer(object):
    """Records every raw request; answers with what the test scripted.

    `respond` maps a Request to the raw response bytes (default: 200 with
    the program for GET, 200 with no body for PUT).
    """

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests = []
        self.program = PROGRAM_BODY
        self.job_id = 'server_1_1700000000_00001'
        self.respond = self.default_response
        self.tls = None
        self.handshake_errors = []
        self.thread = threading.Thread(target=self.serve)
        self.thread.daemon = True
        self.thread.start()

    def url(self, userinfo=''):
        scheme = 'https' if self.tls else 'http'
        return '%s://%s127.0.0.1:%d%s' % (scheme, userinfo, self.port, CGI_PATH)

    def default_response(self, request):
        if request.method == 'GET':
            return (b'HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream'
                    b'\r\nContent-Length: %d\r\nJob-Id: %s\r\n\r\n'
                    % (len(self.program), self.job_id.encode()) + self.program)
        return b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n'

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                if self.tls is not None:
                    conn.settimeout(60)
                    try:
                        conn = self.tls.wrap_socket(conn, server_side=True)
                    except (OSError, ValueError) as exc:
                        self.handshake_errors.append(exc)
                        continue
                    conn.settimeout(None)
                self.handle(conn)
            except OSError:
                pass
            finally:
                conn.close()

    def handle(self, conn):
        data = b''
        while b'\r\n\r\n' not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, body = data.split(b'\r\n\r\n', 1)
        request = Request(head, b'')
        length = int(request.header('Content-Length') or 0)
        body = bytearray(body)      # INFO: += on bytes is quadratic in size
        while len(body) < length:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            body += chunk
        request.body = bytes(body)
        self.requests.append(request)
        reply = self.respond(request)
        if reply is not None:
            conn.sendall(reply)

    def close(self):
        close_listener(self.sock, self.thread)


@pytest.fixture
def scripted():
    server = ScriptedServer()
    yield server
    server.close()


def write_cfg(folder, name='webjob.cfg', **controls):
    """Write a config file; controls given as keyword arguments."""
    path = os.path.join(str(folder), name)
    with open(path, 'w') as handle:
        for key, value in controls.items():
            handle.write('%s=%s\n' % (key, value))
    return path


@pytest.fixture
def job_dir(tmp_path):
    """A TempDirectory for the downloaded program and the output files."""
    path = tmp_path / 'temp'
    path.mkdir()
    return path


def basic_cfg(tmp_path, server, job_dir, put=True, **extra):
    controls = dict(ClientId='client_1', URLGetURL=server.url(),
                    TempDirectory=str(job_dir))
    if put:
        controls['URLPutURL'] = server.url()
    controls.update(extra)
    return write_cfg(tmp_path, **controls)


def output_files(job_dir, suffix):
    return sorted(p for p in os.listdir(str(job_dir)) if p.endswith('.' + suffix))


# Synopsis and modes ##########################################################

@pytest.mark.parametrize('argv', [
    [], ['-ef', 'x.cfg', 'ps'], ['-e', 'x.cfg', 'ps'], ['-e', '-f', 'x.cfg'],
    ['-ht', 'md5', 'file'], ['-h', '-t', 'md5'], ['-v', 'extra'], ['--bogus'],
])
def test_bad_command_line_is_a_usage_error(argv):
    result = run_webjob(argv)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert 'Usage: webjob' in err and 'Traceback' not in err


def test_version_prints_the_originals_form():
    result = run_webjob(['-v'])
    assert result.returncode == 0
    assert re.match(r'webjob \d+\.\d+\.\d+ ssl dsv (32|64) bit\n\Z',
                    result.stdout.decode())


def test_output_to_a_closed_pipe_is_one_clear_line():
    """A reader that went away (| head) is reported, not a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, WEBJOB, '-v'],
                                stdout=write_end, stderr=subprocess.PIPE,
                                timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        'webjob: stdout: the reader went away (broken pipe)']


def test_version_long_form_matches_short_form():
    assert run_webjob(['--version']).stdout == run_webjob(['-v']).stdout


@pytest.mark.parametrize('kind', ['md5', 'SHA1', 'Sha256'])
def test_hashsum_of_a_file_matches_hashlib(tmp_path, kind):
    data = os.urandom(3 * (1 << 20) + 17)
    path = tmp_path / 'blob'
    path.write_bytes(data)
    result = run_webjob(['-h', '-t', kind, str(path)])
    assert result.returncode == 0
    assert result.stdout.decode() == hashlib.new(kind.lower(), data).hexdigest() + '\n'


@pytest.mark.parametrize('tool,kind', [('md5sum', 'md5'), ('sha1sum', 'sha1'),
                                       ('sha256sum', 'sha256')])
def test_hashsum_of_stdin_matches_coreutils(tool, kind):
    data = os.urandom(100000)
    ours = run_webjob(['--hashsum', '--type', kind, '-'], stdin=data)
    theirs = subprocess.run([tool], input=data, stdout=subprocess.PIPE)
    assert ours.stdout.decode().strip() == theirs.stdout.decode().split()[0]


def test_hashsum_refuses_an_unknown_type(tmp_path):
    result = run_webjob(['-h', '-t', 'crc32', '-'], stdin=b'')
    assert_clean_error(result, 4, 'crc32')


def test_hashsum_of_a_missing_file_names_it(tmp_path):
    result = run_webjob(['-h', '-t', 'md5', str(tmp_path / 'nothing')])
    assert_clean_error(result, 4, 'nothing')


@pytest.mark.parametrize('program', ['/bin/ps', '../ps', 'bin/ps', '.', '..'])
def test_program_with_path_information_is_refused(tmp_path, program):
    cfg = write_cfg(tmp_path, ClientId='c', URLGetURL='http://127.0.0.1:9/x')
    result = run_webjob(['-e', '-f', cfg, program])
    assert_clean_error(result, 4, 'path information')


@pytest.mark.parametrize('program', ['a b', 'x;rm', '-x', '$(id)', 'a\x01'])
def test_program_with_shell_characters_is_refused(tmp_path, program):
    cfg = write_cfg(tmp_path, ClientId='c', URLGetURL='http://127.0.0.1:9/x')
    result = run_webjob(['-e', '-f', cfg, program])
    assert_clean_error(result, 4, 'program')


def test_closed_standard_output_is_a_bootstrap_error():
    result = subprocess.run(['sh', '-c', 'exec 1>&-; exec "$0" "$1" -v',
                             sys.executable, WEBJOB], stderr=subprocess.PIPE)
    assert result.returncode == 3
    assert b'descriptor 1 is closed' in result.stderr


# Config file #################################################################

def read_cfg_text(text, tmp_path, name='w.cfg'):
    path = tmp_path / name
    path.write_text(text)
    return webjob.read_config(str(path), webjob.CLIENT_CONTROLS)


def test_controls_are_case_insensitive_and_values_are_not(tmp_path):
    values = read_cfg_text('clientid = Client_A\nurlgeturl=http://h/x\n', tmp_path)
    assert values['ClientId'] == 'Client_A'
    assert values['URLGetURL'] == 'http://h/x'


def test_comment_starts_anywhere_and_whitespace_is_trimmed(tmp_path):
    values = read_cfg_text('# heading\n  ClientId\t=  c1   # trailing words\n'
                  'RunTimeLimit=7#x\n\n', tmp_path)
    assert values['ClientId'] == 'c1'
    assert values['RunTimeLimit'] == 7


def test_defaults_follow_the_man_page(tmp_path):
    values = read_cfg_text('', tmp_path)
    assert values['HashType'] == 'MD5'
    assert values['RunType'] == 'snapshot'
    assert values['TimeoutSignal'] == 9
    assert values['SSLMaxChainLength'] == 1
    assert values['URLAuthType'] == 'none'
    for name in ('GetTimeLimit', 'RunTimeLimit', 'PutTimeLimit',
                 'URLDownloadLimit'):
        assert values[name] == 0
    for name in ('OverwriteExecutable', 'UnlinkExecutable', 'UnlinkOutput',
                 'UploadOnGetFailure', 'GetHookEnable', 'DsvVerifySignature',
                 'SSLVerifyPeerCert', 'SSLUseCertificate'):
        assert values[name] is False


def test_every_man_page_control_is_recognised():
    names = set(name for name, kind, default in webjob.CLIENT_CONTROLS)
    man = open(os.path.join(HERE, '..', 'shared', 'seeds',
                            '000_06762da0a466bcc7.txt')).read()
    documented = set(re.findall(r'\n([A-Z][A-Za-z0-9]+) is (?:required|optional)',
                                man))
    documented.discard('Import')
    assert documented and documented <= names, documented - names


@pytest.mark.parametrize('line,control', [
    ('OverwriteExecutable=yes', 'OverwriteExecutable'),
    ('UnlinkOutput=1', 'UnlinkOutput'),
    ('RunTimeLimit=-1', 'RunTimeLimit'),
    ('GetTimeLimit=ten', 'GetTimeLimit'),
    ('URLDownloadLimit=1e6', 'URLDownloadLimit'),
    ('HashType=SHA512', 'HashType'),
    ('RunType=full', 'RunType'),
    ('TimeoutSignal=0', 'TimeoutSignal'),
    ('TimeoutSignal=999', 'TimeoutSignal'),
    ('URLAuthType=digest', 'URLAuthType'),
    ('URLGetURL=ftp://host/x', 'URLGetURL'),
    ('URLGetURL=http://host', 'URLGetURL'),
    ('URLPutURL=http://host:99999/x', 'URLPutURL'),
    ('ClientId=../etc', 'ClientId'),
    ('ClientId=a b', 'ClientId'),
])
def test_bad_value_names_file_line_and_control(tmp_path, line, control):
    cfg = tmp_path / 'bad.cfg'
    cfg.write_text('ClientId=c\nURLGetURL=http://127.0.0.1:9/x\n%s\n' % line)
    result = run_webjob(['-e', '-f', str(cfg), 'ps'])
    assert_clean_error(result, 5, '%s:3' % cfg, control)


# The man page's URL grammar as a regular expression: the hand-written
# parser (webjob.py avoids importing re) must agree with it everywhere.
MAN_PAGE_URL = re.compile(r'(https?)://(?:([^:@/?#\s]*)(?::([^@/?#\s]*))?@)?'
                          r'(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)'
                          r'(?::([0-9]{1,5}))?(/[^\s#]*)\Z')


def parse_url_by_regex(url):
    match = MAN_PAGE_URL.match(url)
    if match is None:
        return None
    scheme, user, password, host, port, path = match.groups()
    port = int(port) if port else (443 if scheme == 'https' else 80)
    return (scheme, user, password, host, port, path) if 0 < port < 65536 \
        else None


def make_url_like(rng):
    """URL-shaped strings, most of them near the grammar's edges."""
    def piece(chars, most):
        return ''.join(rng.choice(chars) for _ in range(rng.randint(0, most)))
    url = rng.choice(['http://', 'https://', 'ftp://', 'http:/'])
    if rng.random() < 0.5:
        url += piece('ab:@#?% \u00e9', 4) + '@'
    url += rng.choice([piece('ab.-_9@#?[]:', 5), '[' + piece('0f:.g]', 5)
                       + ']'])
    if rng.random() < 0.5:
        url += ':' + piece('0123456789a', 7)
    if rng.random() < 0.8:
        url += '/' + piece('ab/?#& \u2003\n', 5)
    return url


def test_url_parser_agrees_with_the_man_page_grammar():
    import random
    rng = random.Random(20261123)
    urls = [make_url_like(rng) for _ in range(50000)] + [
        'http://u:p:q@host:8080/a?b', 'https://[::1]/', 'http://@h/',
        'http://h:0/', 'http://h:65535/', 'http://h:/', 'http://[]/']
    differ = [u for u in urls if webjob.parse_url(u) != parse_url_by_regex(u)]
    assert differ == []
    assert sum(1 for u in urls if parse_url_by_regex(u)) > 500


@pytest.mark.parametrize('line, expected', [
    ('HTTP/1.1 200 OK', (200, 'OK')),
    ('HTTP/1.0 450 Bad Thing here', (450, 'Bad Thing here')),
    ('HTTP/10.23 999', (999, '')),
    ('HTTP/1.1 200 ', (200, '')),
])
def test_status_line_is_parsed(line, expected):
    assert webjob.parse_status_line(line) == expected


@pytest.mark.parametrize('line', [
    'HTTP/1.1 2000 OK', 'HTTP/1.1  200 OK', 'HTTP/1 200 OK', 'HTTP/.1 200',
    'http/1.1 200 OK', 'HTTP/1.1 20x OK', 'HTTP/1.1 200 O\nK',
    'HTTP/\u0661.1 200 OK', 'HTTP/1.1 200\tOK', ''])
def test_malformed_status_line_is_refused(line):
    with pytest.raises(webjob.TransportError):
        webjob.parse_status_line(line)


def test_unknown_control_is_refused(tmp_path):
    cfg = tmp_path / 'u.cfg'
    cfg.write_text('ClientId=c\nURLGetURL=http://127.0.0.1:9/x\nFrobnicate=Y\n')
    result = run_webjob(['-e', '-f', str(cfg), 'ps'])
    assert_clean_error(result, 5, 'u.cfg:3', 'Frobnicate', 'unknown control')


def test_line_without_equals_is_refused(tmp_path):
    cfg = tmp_path / 'e.cfg'
    cfg.write_text('ClientId c\n')
    assert_clean_error(run_webjob(['-e', '-f', str(cfg), 'ps']), 5, 'e.cfg:1')


@pytest.mark.parametrize('missing', ['ClientId', 'URLGetURL'])
def test_missing_required_control_is_refused(tmp_path, missing):
    controls = dict(ClientId='c', URLGetURL='http://127.0.0.1:9/x')
    del controls[missing]
    cfg = write_cfg(tmp_path, **controls)
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'ps']), 5, missing)


@pytest.mark.parametrize('switch,needed', [
    ('GetHookEnable', 'GetHookCommandLine'),
    ('SSLVerifyPeerCert', 'SSLBundledCAsFile'),
    ('SSLUseCertificate', 'SSLPublicCertFile'),
    ('DsvVerifySignature', 'DsvCertificateTree'),
])
def test_switch_makes_its_controls_required(tmp_path, switch, needed):
    cfg = write_cfg(tmp_path, ClientId='c', URLGetURL='http://127.0.0.1:9/x',
                    **{switch: 'Y'})
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'ps']), 5, needed)


def test_password_is_never_printed_in_errors(tmp_path):
    cfg = tmp_path / 'p.cfg'
    cfg.write_text('ClientId=c\nURLPassword=s3cret-word\n'
                   'URLGetURL=http://u:s3cret-word@127.0.0.1:1/x\n')
    result = run_webjob(['-e', '-f', str(cfg), 'ps'])
    assert result.returncode == 8
    assert b's3cret-word' not in result.stderr + result.stdout


def test_config_from_stdin(tmp_path, scripted, job_dir):
    text = 'ClientId=client_1\nURLGetURL=%s\nTempDirectory=%s\n' % (
        scripted.url(), job_dir)
    result = run_webjob(['-e', '-f', '-', 'job.sh'], stdin=text.encode())
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'hello \n'


def test_later_config_in_a_list_wins(tmp_path):
    first = write_cfg(tmp_path, 'a.cfg', ClientId='a', RunTimeLimit='5')
    second = write_cfg(tmp_path, 'b.cfg', ClientId='b')
    values = webjob.read_config(first + ',' + second, webjob.CLIENT_CONTROLS)
    assert values['ClientId'] == 'b' and values['RunTimeLimit'] == 5


def test_import_is_relative_to_the_importing_file(tmp_path):
    sub = tmp_path / 'sub'
    sub.mkdir()
    (sub / 'common.cfg').write_text('HashType=sha1\n')
    (sub / 'main.cfg').write_text('Import=common.cfg\nClientId=x\n')
    values = webjob.read_config(str(sub / 'main.cfg'), webjob.CLIENT_CONTROLS)
    assert values['HashType'] == 'SHA1' and values['ClientId'] == 'x'


def chain_of_imports(tmp_path, depth):
    for level in range(depth + 1):
        text = 'Import=level%d.cfg\n' % (level + 1) if level < depth else \
            'ClientId=deep\n'
        (tmp_path / ('level%d.cfg' % level)).write_text(text)
    return str(tmp_path / 'level0.cfg')


def test_import_three_levels_deep_is_allowed(tmp_path):
    values = webjob.read_config(chain_of_imports(tmp_path, 3),
                                webjob.CLIENT_CONTROLS)
    assert values['ClientId'] == 'deep'


def test_import_four_levels_deep_is_refused(tmp_path):
    with pytest.raises(webjob.PropertiesError, match='levels deep'):
        webjob.read_config(chain_of_imports(tmp_path, 4), webjob.CLIENT_CONTROLS)


def test_import_loop_is_refused(tmp_path):
    (tmp_path / 'a.cfg').write_text('Import=b.cfg\n')
    (tmp_path / 'b.cfg').write_text('Import=a.cfg\n')
    with pytest.raises(webjob.PropertiesError, match='loop'):
        webjob.read_config(str(tmp_path / 'a.cfg'), webjob.CLIENT_CONTROLS)


def test_missing_import_is_a_properties_error(tmp_path):
    cfg = tmp_path / 'i.cfg'
    cfg.write_text('Import=nowhere.cfg\n')
    assert_clean_error(run_webjob(['-e', '-f', str(cfg), 'ps']), 5, 'nowhere.cfg')


def test_missing_temp_directory_is_a_configure_error(tmp_path):
    cfg = write_cfg(tmp_path, ClientId='c', URLGetURL='http://127.0.0.1:9/x',
                    TempDirectory=str(tmp_path / 'absent'))
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'ps']), 7, 'TempDirectory')


def test_temp_directory_falls_back_to_tmpdir(tmp_path, scripted, job_dir):
    cfg = write_cfg(tmp_path, ClientId='client_1', URLGetURL=scripted.url())
    result = run_webjob(['-e', '-f', cfg, 'job.sh'],
                        env={'TMPDIR': str(job_dir), 'TMP': '/nonexistent'})
    assert result.returncode == 0, result.stderr
    assert os.path.exists(str(job_dir / 'job.sh'))


def test_overlong_tmpdir_is_rejected(tmp_path):
    cfg = write_cfg(tmp_path, ClientId='c', URLGetURL='http://127.0.0.1:9/x')
    result = run_webjob(['-e', '-f', cfg, 'ps'], env={'TMPDIR': '/x' * 3000})
    assert_clean_error(result, 7, 'TMPDIR')


# The GET request on the wire ################################################

def test_get_request_is_byte_exact(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False)
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 0
    get = scripted.requests[0]
    query = ('VERSION=%s&SYSTEM=%s&CLIENTID=client_1&FILENAME=job.sh'
             '&RUNTYPE=snapshot' % (webjob.http_escape(webjob.version_string()),
                                    webjob.http_escape(webjob.system_string())))
    expected = ('GET %s?%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n'
                'Content-Type: application/octet-stream\r\nContent-Length: 0\r\n'
                'Connection: close' % (CGI_PATH, query, scripted.port)).encode()
    assert get.head == expected


def test_query_escaping_follows_the_original():
    assert webjob.http_escape('a-Z_0./\\') == 'a-Z_0./\\'
    assert webjob.http_escape('x y') == 'x+y'
    assert webjob.http_escape('a&b=c%\u00e9') == 'a%26b%3dc%25%c3%a9'


def test_host_header_always_carries_the_port():
    assert webjob.Target('http://h/x').host_header() == 'h:80'
    assert webjob.Target('https://h/x').host_header() == 'h:443'


def test_runtype_linktest_is_sent(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False, RunType='LinkTest')
    run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert ('RUNTYPE', 'linktest') in scripted.requests[0].params()


def test_basic_auth_uses_url_username_and_password(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False, URLAuthType='basic',
                    URLUsername='client_1', URLPassword='access')
    run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert scripted.requests[0].header('Authorization') == \
        'Basic Y2xpZW50XzE6YWNjZXNz'


def test_credentials_in_the_url_beat_the_controls(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False, URLAuthType='basic',
                    URLGetURL=scripted.url('u1:p1@'), URLUsername='client_1',
                    URLPassword='access')
    run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert scripted.requests[0].header('Authorization') == 'Basic dTE6cDE='


def test_user_and_pass_tokens_are_replaced(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False, URLAuthType='basic',
                    URLGetURL=scripted.url('%user:%pass@'), URLUsername='who',
                    URLPassword='pw')
    run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert scripted.requests[0].header('Authorization') == 'Basic d2hvOnB3'


def test_no_authorization_without_basic_auth_type(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False,
                    URLUsername='client_1', URLPassword='access')
    run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert scripted.requests[0].header('Authorization') is None


def test_downloaded_program_has_mode_0700(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False)
    run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert os.stat(str(job_dir / 'job.sh')).st_mode & 0o777 == 0o700
    assert (job_dir / 'job.sh').read_bytes() == PROGRAM_BODY


def test_options_pass_through_untouched(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False)
    result = run_webjob(['-e', '-f', cfg, 'job.sh', '-aux', '-f', 'x y', '-v'])
    assert result.stdout == b'hello -aux -f x y -v\n'
    assert result.stderr == b'to stderr\n'


# GET failures ###############################################################

def reply(status_line, headers=b'', body=b''):
    return lambda request: b'HTTP/1.1 ' + status_line + b'\r\n' + headers + \
        b'\r\n' + body


def assert_get_failed_and_nothing_ran(result, job_dir, *words):
    assert_clean_error(result, 8, 'GetStage', *words)
    assert not os.path.exists(str(job_dir / 'job.sh'))
    assert result.stdout == b''


def test_non_2xx_fails_the_get_stage(tmp_path, scripted, job_dir):
    scripted.respond = reply(b'404 Not Found', b'Content-Length: 0\r\n')
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_get_failed_and_nothing_ran(result, job_dir, 'Status = [404]',
                                      'Reason = [Not Found]')
    assert [r.method for r in scripted.requests] == ['GET']


def test_missing_content_length_fails_the_get_stage(tmp_path, scripted, job_dir):
    scripted.respond = reply(b'200 OK', b'', PROGRAM_BODY)
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    assert_get_failed_and_nothing_ran(run_webjob(['-e', '-f', cfg, 'job.sh']),
                                      job_dir, 'Content-Length')


def test_short_body_fails_the_get_stage(tmp_path, scripted, job_dir):
    scripted.respond = reply(b'200 OK', b'Content-Length: 999\r\n', PROGRAM_BODY)
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    assert_get_failed_and_nothing_ran(run_webjob(['-e', '-f', cfg, 'job.sh']),
                                      job_dir, 'Mismatch'.lower())
    assert os.listdir(str(job_dir)) == []


def test_body_over_download_limit_fails_the_get_stage(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir,
                    URLDownloadLimit=str(len(PROGRAM_BODY) - 1))
    assert_get_failed_and_nothing_ran(run_webjob(['-e', '-f', cfg, 'job.sh']),
                                      job_dir, 'URLDownloadLimit')


def test_body_at_download_limit_is_accepted(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False,
                    URLDownloadLimit=str(len(PROGRAM_BODY)))
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 0


def test_duplicate_content_length_fails_the_get_stage(tmp_path, scripted, job_dir):
    scripted.respond = reply(b'200 OK', b'Content-Length: 5\r\nContent-Length: 5'
                             b'\r\n', b'#!/bi')
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    assert_get_failed_and_nothing_ran(run_webjob(['-e', '-f', cfg, 'job.sh']),
                                      job_dir, 'already defined')


def test_oversized_header_block_fails_the_get_stage(tmp_path, scripted, job_dir):
    scripted.respond = reply(b'200 OK', b'X-Pad: ' + b'a' * 20000 + b'\r\n')
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    assert_get_failed_and_nothing_ran(run_webjob(['-e', '-f', cfg, 'job.sh']),
                                      job_dir, '16383')


def test_garbage_status_line_fails_the_get_stage(tmp_path, scripted, job_dir):
    scripted.respond = lambda request: b'SSH-2.0-OpenSSH\r\n\r\n'
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    assert_get_failed_and_nothing_ran(run_webjob(['-e', '-f', cfg, 'job.sh']),
                                      job_dir, 'status line')


def test_refused_connection_fails_the_get_stage(tmp_path, job_dir):
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    cfg = write_cfg(tmp_path, ClientId='c', TempDirectory=str(job_dir),
                    URLGetURL='http://127.0.0.1:%d/x' % port)
    assert_get_failed_and_nothing_ran(run_webjob(['-e', '-f', cfg, 'job.sh']),
                                      job_dir, 'connect')


def test_get_time_limit_bounds_a_stalled_server(tmp_path, scripted, job_dir):
    """The server never answers on its own: only the limit can end the GET
    (else run_webjob's own deadline fails the test)."""
    release = threading.Event()

    def stall(request):
        release.wait(300)
        return None
    scripted.respond = stall
    cfg = basic_cfg(tmp_path, scripted, job_dir, GetTimeLimit='1')
    try:
        result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    finally:
        release.set()
    assert_get_failed_and_nothing_ran(result, job_dir, 'GetTimeLimit')


def test_existing_program_is_kept_without_overwrite(tmp_path, scripted, job_dir):
    (job_dir / 'job.sh').write_bytes(b'#!/bin/sh\necho old\n')
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False)
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_clean_error(result, 8, 'OverwriteExecutable')
    assert (job_dir / 'job.sh').read_bytes() == b'#!/bin/sh\necho old\n'
    assert scripted.requests == []


def test_overwrite_executable_replaces_the_program(tmp_path, scripted, job_dir):
    (job_dir / 'job.sh').write_bytes(b'#!/bin/sh\necho old\n')
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False,
                    OverwriteExecutable='Y')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert result.returncode == 0 and result.stdout == b'hello \n'


# RUN stage ###################################################################

def test_without_put_output_goes_to_stdout_and_stderr(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False)
    result = run_webjob(['-e', '-f', cfg, 'job.sh', 'x'])
    assert result.returncode == 0
    assert (result.stdout, result.stderr) == (b'hello x\n', b'to stderr\n')
    assert output_files(job_dir, 'out') == []


def test_script_without_interpreter_line_runs_under_sh(tmp_path, scripted, job_dir):
    scripted.program = b'echo plain $1\n'
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False)
    result = run_webjob(['-e', '-f', cfg, 'job.sh', 'script'])
    assert result.returncode == 0 and result.stdout == b'plain script\n'


GRANDCHILD = b'''#!/bin/sh
sh -c 'trap "" TERM; echo $$ > "$WJ_MARK.tmp"; mv "$WJ_MARK.tmp" "$WJ_MARK"; exec sleep 300' &
wait
'''


def process_gone(pid):
    """True once pid is dead or a zombie waiting for its reaper."""
    try:
        with open('/proc/%d/stat' % pid) as handle:
            return handle.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except IOError:
        return True


def wait_until(predicate, timeout=60.0):
    """True once predicate() is; False after timeout (a deadline for a
    failure, generous because the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)     # poll interval while waiting on the event
    return predicate()


#: Time limits, in seconds, for a test whose child must reach a point (a
#: trap set, a pid written) before the limit fires: tried in turn until it
#: does, so a loaded machine costs time, not a false failure.
GROWING_LIMITS = (1, 2, 4, 8, 16, 32)


def until_reached(tmp_path, attempt):
    """attempt(limit, folder) -> (result, reached) with each of
    GROWING_LIMITS and a fresh folder, until reached; (result, limit, folder).
    """
    for limit in GROWING_LIMITS:
        folder = tmp_path / ('limit-%d' % limit)
        folder.mkdir()
        result, reached = attempt(limit, folder)
        if reached:
            return result, limit, folder
    pytest.fail('the child never reached its point before a %d s limit'
                % limit)


def run_until_marked(tmp_path, scripted, **controls):
    """Run job.sh under each RunTimeLimit of GROWING_LIMITS until it has
    created the file $WJ_MARK before the limit; (result, limit, mark)."""
    def attempt(limit, folder):
        cfg = basic_cfg(folder, scripted, folder, RunTimeLimit=str(limit),
                        **controls)
        result = run_webjob(['-e', '-f', cfg, 'job.sh'],
                            env={'WJ_MARK': str(folder / 'mark')})
        return result, (folder / 'mark').exists()
    result, limit, folder = until_reached(tmp_path, attempt)
    return result, limit, folder / 'mark'


def test_run_time_limit_kills_the_whole_process_group(tmp_path, scripted):
    """The grandchild ignores TERM and writes its pid once it does; only a
    run in which it got that far before the limit says anything."""
    scripted.program = GRANDCHILD
    result, limit, mark = run_until_marked(tmp_path, scripted,
                                           TimeoutSignal='15')
    assert_clean_error(result, 9, 'RunTimeLimit')
    pid = int(mark.read_text())
    assert wait_until(lambda: process_gone(pid))
    env = scripted.requests[-1].body.decode()
    assert 'RunError=RunTimeLimit (%d s) expired' % limit in env
    assert 'KidReason=The kid was killed' in env


def test_timeout_signal_is_the_one_sent(tmp_path, scripted):
    """The program marks that its trap is set; a run where the signal came
    first is tried again with a longer limit."""
    scripted.program = (b'#!/bin/sh\ntrap "echo got INT; exit 3" INT\n'
                        b'touch "$WJ_MARK"\nsleep 30 & wait\n')
    result, limit, mark = run_until_marked(tmp_path, scripted,
                                           TimeoutSignal='2')
    assert result.returncode == 9
    put = scripted.requests[-1]
    assert put.body.startswith(b'got INT\n')
    assert b'KidStatus=3\n' in put.body


def test_kid_killed_by_a_signal_is_recorded(tmp_path, scripted, job_dir):
    scripted.program = b'#!/bin/sh\nkill -9 $$\n'
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 0
    env = scripted.requests[-1].body.decode()
    assert 'KidStatus=-1\nKidSignal=9\nKidReason=The kid was killed by signal 9.' in env


def test_kid_exit_status_is_recorded_not_a_failure(tmp_path, scripted, job_dir):
    scripted.program = b'#!/bin/sh\nexit 42\n'
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 0
    assert b'KidStatus=42\nKidSignal=0\n' in scripted.requests[-1].body


def test_program_that_cannot_execute_fails_the_run_stage(tmp_path, scripted,
                                                        job_dir):
    scripted.program = b'#!/nonexistent/interpreter\n'
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_clean_error(result, 9, 'RunStage', 'cannot execute')
    env = scripted.requests[-1].body.decode()
    assert 'KidReason=The kid could not be started.' in env
    assert 'RunError=RunStage' not in env and 'RunError=job.sh: cannot execute' in env


def test_interrupt_kills_the_kid_and_exits_abort(tmp_path, scripted, job_dir):
    marker = tmp_path / 'started'
    scripted.program = b'#!/bin/sh\necho $$ > "$WJ_MARK"\nexec sleep 300\n'
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    env = dict(os.environ, WJ_MARK=str(marker))
    proc = subprocess.Popen([sys.executable, WEBJOB, '-e', '-f', cfg, 'job.sh'],
                            env=env, stderr=subprocess.PIPE)
    assert wait_until(lambda: marker.exists() and marker.read_text().strip())
    kid = int(marker.read_text())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert b'interrupted' in err
    assert wait_until(lambda: process_gone(kid))


# PUT stage ###################################################################

def test_put_request_is_byte_exact(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, URLAuthType='basic',
                    URLUsername='client_1', URLPassword='access')
    assert run_webjob(['-e', '-f', cfg, 'job.sh', 'a']).returncode == 0
    put = scripted.requests[1]
    out, err = b'hello a\n', b'to stderr\n'
    env_name = output_files(job_dir, 'env')[0]
    env = (job_dir / env_name).read_bytes()
    query = ('VERSION=%s&SYSTEM=%s&CLIENTID=client_1&FILENAME=job.sh'
             '&RUNTYPE=snapshot&STDOUT_LENGTH=%d&STDERR_LENGTH=%d'
             '&STDENV_LENGTH=%d' % (webjob.http_escape(webjob.version_string()),
                                    webjob.http_escape(webjob.system_string()),
                                    len(out), len(err), len(env)))
    expected = ('PUT %s?%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n'
                'Content-Type: application/octet-stream\r\nContent-Length: %d\r\n'
                'Authorization: Basic Y2xpZW50XzE6YWNjZXNz\r\n'
                'Job-Id: %s\r\nConnection: close'
                % (CGI_PATH, query, scripted.port, len(out + err + env),
                   scripted.job_id)).encode()
    assert put.head == expected
    assert put.body == out + err + env


def test_env_record_has_the_22_keys_in_order(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    run_webjob(['-e', '-f', cfg, 'job.sh', '-x'])
    env = scripted.requests[1].body.decode().split('to stderr\n', 1)[1]
    keys = [line.split('=', 1)[0] for line in env.splitlines()]
    assert keys == list(webjob.ENV_KEYS) and len(keys) == 22
    values = dict(line.split('=', 1) for line in env.splitlines())
    assert values['Jid'] == scripted.job_id
    assert values['CommandLine'] == 'job.sh -x'
    assert values['GetRequest'] == values['Command'] == 'job.sh'
    assert values['KidReason'] == 'The kid exited cleanly.'
    assert values['GetError'] == values['RunError'] == 'NA'
    assert values['HashType'] == 'MD5'
    assert values['StdOutHash'] == hashlib.md5(b'hello -x\n').hexdigest()
    assert values['StdErrHash'] == hashlib.md5(b'to stderr\n').hexdigest()
    epoch = r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+ \(\d+\.\d{6}\)\Z'
    for key in ('JobEpoch', 'GetEpoch', 'RunEpoch', 'PutEpoch'):
        assert re.match(epoch, values[key]), values[key]
    assert int(values['Pid']) > 0 and int(values['KidPid']) > 0


@pytest.mark.parametrize('kind', ['SHA1', 'SHA256'])
def test_hash_type_applies_to_both_streams(tmp_path, scripted, job_dir, kind):
    cfg = basic_cfg(tmp_path, scripted, job_dir, HashType=kind.lower())
    run_webjob(['-e', '-f', cfg, 'job.sh'])
    body = scripted.requests[1].body.decode()
    assert 'HashType=%s\n' % kind in body
    assert 'StdOutHash=%s\n' % hashlib.new(kind, b'hello \n').hexdigest() in body


def test_output_files_are_named_by_job_epoch_and_nonce(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    run_webjob(['-e', '-f', cfg, 'job.sh'])
    names = sorted(os.listdir(str(job_dir)))
    stems = set(name.rsplit('.', 1)[0] for name in names if name != 'job.sh')
    assert len(stems) == 1
    assert re.match(r'webjob_\d+_[0-9a-f]+\Z', stems.pop())
    assert sorted(n.rsplit('.', 1)[1] for n in names if n != 'job.sh') == \
        ['env', 'err', 'out']


def test_large_output_is_streamed_and_hashed(tmp_path, scripted, job_dir):
    scripted.program = b'#!/bin/sh\nhead -c 50000000 /dev/zero\n'
    cfg = basic_cfg(tmp_path, scripted, job_dir, HashType='SHA256')
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 0
    put = scripted.requests[1]
    assert ('STDOUT_LENGTH', '50000000') in put.params()
    digest = hashlib.sha256(b'\0' * 50000000).hexdigest()
    assert ('StdOutHash=%s' % digest).encode() in put.body[50000000:]


def test_non_2xx_fails_the_put_stage(tmp_path, scripted, job_dir):
    scripted.respond = lambda r: scripted.default_response(r) if r.method == \
        'GET' else b'HTTP/1.1 456 Content-Length Mismatch\r\nContent-Length: 0\r\n\r\n'
    cfg = basic_cfg(tmp_path, scripted, job_dir, UnlinkOutput='Y')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_clean_error(result, 10, 'PutStage', 'Status = [456]')
    assert len(output_files(job_dir, 'out')) == 1  # kept: the upload failed


def test_failed_run_and_put_is_multi_stage(tmp_path, scripted, job_dir):
    scripted.program = b'#!/bin/sh\nexec sleep 30\n'
    scripted.respond = lambda r: scripted.default_response(r) if r.method == \
        'GET' else b'HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n'
    cfg = basic_cfg(tmp_path, scripted, job_dir, RunTimeLimit='1')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert result.returncode == 11
    err = result.stderr.decode()
    assert 'RunStage' in err and 'PutStage' in err


def test_get_failure_skips_the_put_by_default(tmp_path, scripted, job_dir):
    scripted.respond = reply(b'404 Not Found', b'Content-Length: 0\r\n')
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 8
    assert [r.method for r in scripted.requests] == ['GET']


def test_upload_on_get_failure_still_uploads(tmp_path, scripted, job_dir):
    scripted.respond = lambda r: (
        b'HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n' if r.method == 'GET'
        else b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n')
    cfg = basic_cfg(tmp_path, scripted, job_dir, UploadOnGetFailure='Y')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert result.returncode == 8
    put = scripted.requests[1]
    assert put.method == 'PUT' and put.header('Job-Id') is None
    env = put.body.decode()
    assert 'Jid=NA\n' in env and 'RunEpoch=NA\n' in env
    assert re.search(r'GetError=GetStage.*|GetError=.*Status = \[404\]', env)
    assert 'KidReason=The kid was not run.' in env


def test_upload_on_get_failure_with_failed_put_is_multi_stage(tmp_path, scripted,
                                                              job_dir):
    scripted.respond = reply(b'403 Forbidden', b'Content-Length: 0\r\n')
    cfg = basic_cfg(tmp_path, scripted, job_dir, UploadOnGetFailure='Y')
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 11


def test_unlink_output_removes_files_after_upload(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, UnlinkOutput='Y')
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 0
    assert sorted(os.listdir(str(job_dir))) == ['job.sh']


def test_unlink_executable_removes_the_program(tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, UnlinkExecutable='Y',
                    UnlinkOutput='Y')
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 0
    assert os.listdir(str(job_dir)) == []


def test_put_time_limit_bounds_a_stalled_upload(tmp_path, scripted, job_dir):
    release = threading.Event()

    def stall_put(request):
        if request.method == 'GET':
            return scripted.default_response(request)
        release.wait(300)
        return None
    scripted.respond = stall_put
    cfg = basic_cfg(tmp_path, scripted, job_dir, PutTimeLimit='1')
    try:
        result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    finally:
        release.set()
    assert_clean_error(result, 10, 'PutTimeLimit')


# GetHook (man page examples 6-8) ############################################

def serve_files(server, files):
    """Answer GETs by FILENAME from a dict; 404 for anything else."""
    def respond(request):
        if request.method != 'GET':
            return b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n'
        name = dict(request.params()).get('FILENAME')
        if name not in files:
            return b'HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n'
        body = files[name]
        return (b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nJob-Id: %s\r\n\r\n'
                % (len(body), server.job_id.encode()) + body)
    server.respond = respond


def hook_cfg(tmp_path, server, job_dir, command, status='0', suffix=None, **extra):
    controls = dict(GetHookEnable='Y', GetHookCommandLine=command,
                    GetHookStatus=status)
    if suffix is not None:
        controls['GetHookSuffix'] = suffix
    controls.update(extra)
    return basic_cfg(tmp_path, server, job_dir, put=False, **controls)


def test_example6_gzip_hook_runs_the_unzipped_program(tmp_path, scripted, job_dir):
    packed = subprocess.run(['gzip', '-c'], input=PROGRAM_BODY,
                            stdout=subprocess.PIPE).stdout
    serve_files(scripted, {'job.sh.gz': packed})
    cfg = hook_cfg(tmp_path, scripted, job_dir, 'gzip -d %vp', suffix='.gz')
    result = run_webjob(['-e', '-f', cfg, 'job.sh', 'gz'])
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'hello gz\n'
    assert dict(scripted.requests[0].params())['FILENAME'] == 'job.sh.gz'


@pytest.fixture(scope='module')
def gpg_home(tmp_path_factory):
    """A throw-away GnuPG home with one signing key made by gpg itself."""
    home = tmp_path_factory.mktemp('gnupg')
    os.chmod(str(home), 0o700)
    env = dict(os.environ, GNUPGHOME=str(home))
    subprocess.run(['gpg', '--batch', '--pinentry-mode', 'loopback',
                    '--passphrase', '', '--quick-gen-key',
                    'WebJob Test <webjob@example.invalid>', 'ed25519', 'sign',
                    'never'], env=env, check=True, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    yield env
    subprocess.run(['gpgconf', '--kill', 'all'], env=env)


def gpg_sign(env, data):
    return subprocess.run(['gpg', '--batch', '--yes', '--sign'], input=data,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          check=True).stdout


def test_example7_gpg_hook_runs_a_signed_program(tmp_path, scripted, job_dir,
                                                 gpg_home):
    serve_files(scripted, {'job.sh.gpg': gpg_sign(gpg_home, PROGRAM_BODY)})
    cfg = hook_cfg(tmp_path, scripted, job_dir, 'gpg --batch --decrypt %vp > %tp',
                   suffix='.gpg')
    result = run_webjob(['-e', '-f', cfg, 'job.sh', 'gpg'],
                        env={'GNUPGHOME': gpg_home['GNUPGHOME']})
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'hello gpg\n'


def test_example7_tampered_gpg_payload_is_not_run(tmp_path, scripted, job_dir,
                                                  gpg_home):
    signed = bytearray(gpg_sign(gpg_home, b'#!/bin/sh\necho "EVIL"\n' * 4))
    signed[len(signed) // 2] ^= 0x01
    serve_files(scripted, {'job.sh.gpg': bytes(signed)})
    cfg = hook_cfg(tmp_path, scripted, job_dir, 'gpg --batch --decrypt %vp > %tp',
                   suffix='.gpg')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'],
                        env={'GNUPGHOME': gpg_home['GNUPGHOME']})
    assert result.returncode == 8
    assert b'EVIL' not in result.stdout
    assert b'GetHookStatus' in result.stderr


def test_example8_logger_hook_always_succeeds(tmp_path, scripted, job_dir):
    serve_files(scripted, {'job.sh': PROGRAM_BODY})
    command = '{ logger -p user.alert -t "webjob[%pid]" "%vp ---> %tp" ; true ; }'
    cfg = hook_cfg(tmp_path, scripted, job_dir, command)
    result = run_webjob(['-e', '-f', cfg, 'job.sh', 'logged'])
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'hello logged\n'
    assert dict(scripted.requests[0].params())['FILENAME'] == 'job.sh'


def test_hook_tokens_expand(tmp_path, scripted, job_dir):
    serve_files(scripted, {'job.sh.v': PROGRAM_BODY})
    command = ('echo "tp=%tp vp=%vp s=%s pid=%pid lit=%%tp" > tokens.txt; '
               'mv %vp %tp')
    cfg = hook_cfg(tmp_path, scripted, job_dir, command, suffix='.v')
    proc = subprocess.Popen([sys.executable, WEBJOB, '-e', '-f', cfg, 'job.sh'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    tokens = (job_dir / 'tokens.txt').read_text()
    assert tokens == 'tp=job.sh vp=job.sh.v s=.v pid=%d lit=%%tp\n' % proc.pid


def test_hook_runs_in_temp_directory(tmp_path, scripted, job_dir):
    serve_files(scripted, {'job.sh': PROGRAM_BODY})
    cfg = hook_cfg(tmp_path, scripted, job_dir, 'pwd > where.txt')
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 0
    assert (job_dir / 'where.txt').read_text().strip() == str(job_dir)


def test_hook_with_the_wrong_status_vetoes_the_program(tmp_path, scripted, job_dir):
    serve_files(scripted, {'job.sh': PROGRAM_BODY})
    cfg = hook_cfg(tmp_path, scripted, job_dir, 'exit 3', status='0')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_clean_error(result, 8, 'GetHook', 'status 3')
    assert result.stdout == b''


def test_hook_status_other_than_zero_can_bless(tmp_path, scripted, job_dir):
    serve_files(scripted, {'job.sh': PROGRAM_BODY})
    cfg = hook_cfg(tmp_path, scripted, job_dir, 'exit 7', status='7')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert result.returncode == 0 and result.stdout == b'hello \n'


def test_hanging_hook_is_killed_at_get_time_limit(tmp_path, scripted):
    """The hook sleeps 300 s, past run_webjob's own deadline: only the limit
    can end it in time.  It writes its pid first; a run in which the limit
    came before that is tried again with a longer one."""
    serve_files(scripted, {'job.sh': PROGRAM_BODY})

    def attempt(limit, folder):
        command = 'sh -c "echo \\$\\$ > %s; exec sleep 300"; true' % (
            folder / 'hook.pid')
        cfg = hook_cfg(folder, scripted, folder, command,
                       GetTimeLimit=str(limit))
        result = run_webjob(['-e', '-f', cfg, 'job.sh'])
        return result, (folder / 'hook.pid').exists()
    result, limit, folder = until_reached(tmp_path, attempt)
    assert_clean_error(result, 8, 'GetTimeLimit')
    pid = int((folder / 'hook.pid').read_text())
    assert wait_until(lambda: process_gone(pid))
    assert result.stdout == b''


def test_hook_that_produces_no_target_fails(tmp_path, scripted, job_dir):
    serve_files(scripted, {'job.sh.gz': b'not gzip'})
    cfg = hook_cfg(tmp_path, scripted, job_dir, 'true', suffix='.gz')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'job.sh']), 8,
                       'was not produced')


# -g|--get-url ###############################################################

def test_get_url_streams_a_url_to_stdout(tmp_path, scripted):
    scripted.program = os.urandom(3 * (1 << 20) + 5)
    result = run_webjob(['-g', 'http://127.0.0.1:%d/file.bin' % scripted.port])
    assert result.returncode == 0, result.stderr
    assert result.stdout == scripted.program
    assert scripted.requests[0].request_line == 'GET /file.bin HTTP/1.1'


def test_get_url_honours_the_download_limit(tmp_path, scripted):
    cfg = write_cfg(tmp_path, URLDownloadLimit='10')
    result = run_webjob(['-g', '-f', cfg, 'http://127.0.0.1:%d/f' % scripted.port])
    assert_clean_error(result, 8, 'URLDownloadLimit')


def test_get_url_sends_basic_auth_from_the_config(tmp_path, scripted):
    cfg = write_cfg(tmp_path, URLAuthType='basic', URLUsername='a', URLPassword='b')
    run_webjob(['--get-url', '--file', cfg, 'http://127.0.0.1:%d/f' % scripted.port])
    assert scripted.requests[0].header('Authorization') == 'Basic YTpi'


def test_get_url_sends_no_auth_without_urlauthtype_basic(scripted):
    """As -e: credentials in the URL alone are not sent (URLAuthType=none)."""
    result = run_webjob(['-g', 'http://a:b@127.0.0.1:%d/f' % scripted.port])
    assert result.returncode == 0, result.stderr
    assert scripted.requests[0].header('Authorization') is None


def test_get_url_refuses_a_bad_url():
    assert_clean_error(run_webjob(['-g', 'ftp://x/y']), 4, 'url')


def test_get_url_names_the_url_once_when_it_cannot_connect():
    from conftest import free_port
    url = 'http://127.0.0.1:%d/x' % free_port()
    result = run_webjob(['-g', url])
    assert_clean_error(result, 8, 'connect')
    assert result.stderr.decode().count(url) == 1


# HTTPS #######################################################################

# The test CA and its certificates: conftest.PKI, the session fixture pki.


@pytest.fixture
def tls_server(pki):
    server = ScriptedServer()
    server.tls = pki.server_context()
    yield server
    server.close()


def tls_cfg(tmp_path, server, job_dir, pki, **extra):
    controls = dict(SSLVerifyPeerCert='Y', SSLBundledCAsFile=pki.path('ca.crt'),
                    SSLExpectedPeerCN='webjob.test')
    controls.update(extra)
    return basic_cfg(tmp_path, server, job_dir, **controls)


NEWEST = sorted(
    (p for p in __import__('glob').glob('/root/.pyenv/versions/3.*/bin/python')),
    key=lambda p: tuple(int(x) for x in p.split('/')[-3].split('.')))
TLS_PYTHONS = [NEWEST[0], NEWEST[-1]] if NEWEST else [sys.executable]


@pytest.mark.parametrize('python', TLS_PYTHONS)
def test_https_job_with_verified_server(tmp_path, tls_server, job_dir, pki, python):
    cfg = tls_cfg(tmp_path, tls_server, job_dir, pki)
    result = run_webjob(['-e', '-f', cfg, 'job.sh', 'tls'], python=python)
    assert result.returncode == 0, result.stderr
    assert [r.method for r in tls_server.requests] == ['GET', 'PUT']
    assert tls_server.requests[1].body.startswith(b'hello tls\n')
    assert result.stderr == b''


def test_unverified_https_warns_once(tmp_path, tls_server, job_dir):
    cfg = basic_cfg(tmp_path, tls_server, job_dir)
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert result.returncode == 0
    assert result.stderr.decode().count('SSLVerifyPeerCert=N') == 1


@pytest.mark.parametrize('python', TLS_PYTHONS)
@pytest.mark.parametrize('certificate,controls,words', [
    ('server-rogue', {}, ['certificate verify failed']),
    ('server-wrong-cn', {}, ['SSLExpectedPeerCN', 'other.test']),
    ('server', {'SSLExpectedPeerCN': 'WebJob.test'}, ['SSLExpectedPeerCN']),
    ('server-expired', {}, ['expired']),
    ('server-via-inter', {}, ['SSLMaxChainLength is 1']),
])
def test_https_failures_fail_the_get_stage(tmp_path, pki, job_dir, python,
                                           certificate, controls, words):
    server = ScriptedServer()
    server.tls = pki.server_context(certificate)
    try:
        cfg = tls_cfg(tmp_path, server, job_dir, pki, **controls)
        result = run_webjob(['-e', '-f', cfg, 'job.sh'], python=python)
    finally:
        server.close()
    assert_clean_error(result, 8, 'GetStage', *words)
    assert server.requests == []
    assert not os.path.exists(str(job_dir / 'job.sh'))


@pytest.mark.parametrize('python', TLS_PYTHONS)
def test_chain_through_one_intermediate_needs_max_chain_length_2(
        tmp_path, pki, job_dir, python):
    server = ScriptedServer()
    server.tls = pki.server_context('server-via-inter')
    try:
        cfg = tls_cfg(tmp_path, server, job_dir, pki, SSLMaxChainLength='2')
        result = run_webjob(['-e', '-f', cfg, 'job.sh'], python=python)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('python', TLS_PYTHONS)
def test_client_certificate_with_passphrase(tmp_path, pki, job_dir, python):
    server = ScriptedServer()
    server.tls = pki.server_context(require_client=True)
    try:
        cfg = tls_cfg(tmp_path, server, job_dir, pki, SSLUseCertificate='Y',
                      SSLPublicCertFile=pki.path('client.crt'),
                      SSLPrivateKeyFile=pki.path('client-encrypted.key'),
                      SSLPassPhrase='flimflam')
        result = run_webjob(['-e', '-f', cfg, 'job.sh'], python=python)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr


def test_missing_client_certificate_is_refused_by_the_server(tmp_path, pki, job_dir):
    server = ScriptedServer()
    server.tls = pki.server_context(require_client=True)
    try:
        cfg = tls_cfg(tmp_path, server, job_dir, pki)
        result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    finally:
        server.close()
    assert_clean_error(result, 8, 'GetStage')
    assert server.requests == []


def test_encrypted_key_without_passphrase_or_terminal_fails(tmp_path, pki, job_dir,
                                                            scripted):
    cfg = tls_cfg(tmp_path, scripted, job_dir, pki, SSLUseCertificate='Y',
                  URLGetURL='https://127.0.0.1:%d/x' % scripted.port,
                  SSLPublicCertFile=pki.path('client.crt'),
                  SSLPrivateKeyFile=pki.path('client-encrypted.key'))
    result = run_webjob(['-e', '-f', cfg, 'job.sh'], stdin=b'', timeout=30)
    assert_clean_error(result, 7, 'SSLPassPhrase')
    assert scripted.requests == []


def test_wrong_passphrase_is_a_configure_error(tmp_path, pki, job_dir, scripted):
    cfg = tls_cfg(tmp_path, scripted, job_dir, pki, SSLUseCertificate='Y',
                  URLGetURL='https://127.0.0.1:%d/x' % scripted.port,
                  SSLPublicCertFile=pki.path('client.crt'),
                  SSLPrivateKeyFile=pki.path('client-encrypted.key'),
                  SSLPassPhrase='wrong')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_clean_error(result, 7, 'SSLPrivateKeyFile')
    assert b'wrong' not in result.stderr


@pytest.mark.parametrize('control', ['SSLBundledCAsFile', 'SSLPublicCertFile',
                                     'SSLPrivateKeyFile'])
def test_missing_ssl_file_names_the_control(tmp_path, pki, job_dir, scripted,
                                            control):
    controls = dict(SSLUseCertificate='Y', SSLPublicCertFile=pki.path('client.crt'),
                    SSLPrivateKeyFile=pki.path('client.key'),
                    URLGetURL='https://127.0.0.1:%d/x' % scripted.port)
    controls[control] = str(tmp_path / 'absent.pem')
    cfg = tls_cfg(tmp_path, scripted, job_dir, pki, **controls)
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'job.sh']), 7, control)


def test_relative_ssl_paths_resolve_from_the_current_directory(tmp_path, pki,
                                                               tls_server, job_dir):
    cfg = tls_cfg(tmp_path, tls_server, job_dir, pki, SSLBundledCAsFile='ca.crt')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'], cwd=pki.dir)
    assert result.returncode == 0, result.stderr


def test_get_time_limit_bounds_the_tls_handshake(tmp_path, pki, job_dir):
    silent = socket.socket()
    silent.bind(('127.0.0.1', 0))
    silent.listen(1)
    try:
        cfg = write_cfg(tmp_path, ClientId='c', TempDirectory=str(job_dir),
                        GetTimeLimit='1', URLGetURL='https://127.0.0.1:%d/x'
                        % silent.getsockname()[1])
        result = run_webjob(['-e', '-f', cfg, 'job.sh'])   # silent forever
    finally:
        silent.close()
    assert_clean_error(result, 8, 'GetTimeLimit')


# PaD (Payload and Delivery) #################################################

SHELLS = [['sh'], ['dash']]
if shutil.which('busybox'):
    SHELLS.append(['busybox', 'sh'])


def make_pad(tmp_path, name, data, subdir='pad dir'):
    """Write payload `name` with `data`, pack it into subdir/name.pad."""
    src_dir = tmp_path / 'src'
    src_dir.mkdir(exist_ok=True)
    src = src_dir / name
    src.write_bytes(data)
    pad_dir = tmp_path / subdir
    pad_dir.mkdir(exist_ok=True)
    pad = pad_dir / (name + '.pad')
    with open(str(pad), 'wb') as out:
        webjob.pad_make_script(str(src), out)
    return pad


def run_pad(pad, args=(), shell=('sh',), cwd=None, env=None):
    """Run the PaD script from another directory; return CompletedProcess."""
    return subprocess.run(list(shell) + [str(pad)] + list(args),
                          cwd=str(cwd or pad.parent.parent),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env)


@pytest.mark.parametrize('shell', SHELLS, ids=' '.join)
def test_every_byte_value_round_trips(tmp_path, shell):
    data = bytes(range(256)) * 1031
    pad = make_pad(tmp_path, 'bytes.bin', data)
    result = run_pad(pad, shell=shell)
    assert result.returncode == 0, result.stderr
    assert (pad.parent / 'bytes.bin').read_bytes() == data


def test_payload_over_block_size_round_trips(tmp_path):
    data = os.urandom((5 << 19) + 1)  # 2.5 MiB + 1: crosses block edges
    pad = make_pad(tmp_path, 'big.bin', data)
    assert run_pad(pad).returncode == 0
    assert (pad.parent / 'big.bin').read_bytes() == data


def test_empty_payload_round_trips(tmp_path):
    pad = make_pad(tmp_path, 'empty', b'')
    assert run_pad(pad).returncode == 0
    assert (pad.parent / 'empty').read_bytes() == b''


def test_tar_gz_delivery_runs_tar_on_payload(tmp_path):
    tree = tmp_path / 'tree'
    tree.mkdir()
    (tree / 'a.txt').write_bytes(b'alpha\n')
    tgz = tmp_path / 'x.tar.gz'
    subprocess.check_call(['tar', 'czf', str(tgz), '-C', str(tmp_path),
                           'tree'])
    pad = make_pad(tmp_path, 'x.tar.gz', tgz.read_bytes())
    result = run_pad(pad, ['tar', 'tzf', 'x.tar.gz'])
    assert result.returncode == 0, result.stderr
    assert b'tree/a.txt' in result.stdout.split()


def test_dot_slash_pad_runs_extracted_program(tmp_path):
    pad = make_pad(tmp_path, 'tool', b'#!/bin/sh\necho "tool:$1:$(pwd)"\n')
    os.chmod(str(pad), 0o755)
    result = subprocess.run(['./tool.pad', './tool', 'a b'],
                            cwd=str(pad.parent), stdout=subprocess.PIPE)
    assert result.returncode == 0
    assert result.stdout == ('tool:a b:%s\n' % pad.parent).encode()


def test_command_runs_in_pad_directory(tmp_path):
    pad = make_pad(tmp_path, 'p.txt', b'x')
    result = run_pad(pad, ['pwd'], cwd=tmp_path / 'src')
    assert result.stdout.decode().strip() == str(pad.parent)


def test_command_exit_status_passed_through(tmp_path):
    pad = make_pad(tmp_path, 'p.txt', b'x')
    assert run_pad(pad, ['sh', '-c', 'exit 7']).returncode == 7


def test_extracted_file_mode_is_0700(tmp_path):
    pad = make_pad(tmp_path, 'p.txt', b'x')
    run_pad(pad)
    assert os.stat(str(pad.parent / 'p.txt')).st_mode & 0o7777 == 0o700


def test_truncated_pad_extracts_nothing_and_runs_nothing(tmp_path):
    pad = make_pad(tmp_path, 'cut.bin', bytes(range(256)) * 4)
    pad.write_bytes(pad.read_bytes()[:-10])
    result = run_pad(pad, ['touch', 'marker'])
    assert result.returncode != 0
    assert b'truncated' in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert sorted(os.listdir(str(pad.parent))) == ['cut.bin.pad']


def test_damaged_payload_fails_sha256_check(tmp_path):
    pad = make_pad(tmp_path, 'dmg.bin', b'\0' * 100)
    data = bytearray(pad.read_bytes())
    data[-1] = 1
    pad.write_bytes(bytes(data))
    result = run_pad(pad, ['touch', 'marker'])
    assert result.returncode != 0 and b'SHA-256' in result.stderr
    assert sorted(os.listdir(str(pad.parent))) == ['dmg.bin.pad']


def test_existing_payload_not_overwritten(tmp_path):
    pad = make_pad(tmp_path, 'keep.txt', b'new')
    (pad.parent / 'keep.txt').write_bytes(b'old')
    result = run_pad(pad, ['touch', 'marker'])
    assert result.returncode == 1 and b'already exists' in result.stderr
    assert (pad.parent / 'keep.txt').read_bytes() == b'old'
    assert not (pad.parent / 'marker').exists()


def test_needs_only_posix_utilities_and_skips_missing_sha256sum(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for tool in ('tail', 'wc', 'tr', 'mv', 'rm', 'chmod'):
        os.symlink(shutil.which(tool), str(bin_dir / tool))
    pad = make_pad(tmp_path, 'p.bin', b'\xff\x00payload')
    result = run_pad(pad, shell=[shutil.which('sh')],
                     env={'PATH': str(bin_dir)})
    assert result.returncode == 0 and result.stderr == b''
    assert (pad.parent / 'p.bin').read_bytes() == b'\xff\x00payload'


@pytest.mark.parametrize('name', ['a b', 'a/b', '-x', '.x', '', "a'b",
                                  'x' * 201, 'caf\xe9'])
def test_unsafe_payload_name_refused(tmp_path, name):
    src = tmp_path / 'src'
    src.write_bytes(b'x')
    with open(str(tmp_path / 'out.pad'), 'wb') as out:
        with pytest.raises(webjob.PadError):
            webjob.pad_make_script(str(src), out, name=name)


def test_missing_source_raises_pad_error(tmp_path):
    with open(str(tmp_path / 'out.pad'), 'wb') as out:
        with pytest.raises(webjob.PadError):
            webjob.pad_make_script(str(tmp_path / 'nope'), out)


def test_payload_name_strips_pad_suffix():
    assert webjob.pad_payload_name('/var/tmp/tool.rpm.pad') == 'tool.rpm'


@pytest.mark.parametrize('name', ['tool.rpm', '.pad', 'dir.pad/'])
def test_payload_name_without_pad_suffix_refused(name):
    with pytest.raises(webjob.PadError):
        webjob.pad_payload_name(name)


def test_pad_make_script_mode_writes_an_executable_file(tmp_path):
    payload = tmp_path / 'tool.bin'
    payload.write_bytes(bytes(range(256)) * 64)
    pad = tmp_path / 'out' / 'tool.bin.pad'
    pad.parent.mkdir()
    result = run_webjob(['--pad-make-script', str(payload), '-o', str(pad)])
    assert result.returncode == 0, result.stderr
    assert os.stat(str(pad)).st_mode & 0o777 == 0o755
    assert subprocess.run([str(pad)], cwd=str(tmp_path)).returncode == 0
    assert (pad.parent / 'tool.bin').read_bytes() == payload.read_bytes()


def test_pad_make_script_mode_to_stdout(tmp_path):
    payload = tmp_path / 'x.txt'
    payload.write_bytes(b'data\n')
    result = run_webjob(['--pad-make-script', str(payload)])
    assert result.returncode == 0
    assert result.stdout.startswith(b'#!/bin/sh\n') and result.stdout.endswith(b'data\n')


def test_pad_make_script_refuses_a_missing_file(tmp_path):
    result = run_webjob(['--pad-make-script', str(tmp_path / 'nope')])
    assert_clean_error(result, 4, 'nope')


def make_pad_bytes(tmp_path, name, data):
    src = tmp_path / ('src-' + name)
    src.mkdir()
    (src / name).write_bytes(data)
    import io
    out = io.BytesIO()
    webjob.pad_make_script(str(src / name), out)
    return out.getvalue()


def test_pad_job_substitutes_payload_and_delivers_a_tarball(tmp_path, scripted,
                                                            job_dir):
    tree = tmp_path / 'tree'
    tree.mkdir()
    (tree / 'evidence.txt').write_bytes(b'collected\n')
    tarball = tmp_path / 'kit.tar.gz'
    subprocess.run(['tar', 'czf', str(tarball), '-C', str(tree), 'evidence.txt'],
                   check=True)
    serve_files(scripted, {'kit.tar.gz.pad': make_pad_bytes(
        tmp_path, 'kit.tar.gz', tarball.read_bytes())})
    cfg = basic_cfg(tmp_path, scripted, job_dir, UnlinkExecutable='Y',
                    UnlinkOutput='Y')
    result = run_webjob(['-e', '-f', cfg, 'kit.tar.gz.pad', 'tar', 'tzf',
                         '%payload'])
    assert result.returncode == 0, result.stderr
    put = scripted.requests[-1]
    assert put.body.startswith(b'evidence.txt\n')
    assert b'CommandLine=kit.tar.gz.pad tar tzf %payload\n' in put.body
    assert os.listdir(str(job_dir)) == []


def test_pad_job_delivers_every_byte_value(tmp_path, scripted, job_dir):
    data = bytes(range(256)) * 4099
    serve_files(scripted, {'blob.bin.pad': make_pad_bytes(tmp_path, 'blob.bin',
                                                          data)})
    cfg = basic_cfg(tmp_path, scripted, job_dir, HashType='SHA256')
    result = run_webjob(['-e', '-f', cfg, 'blob.bin.pad', 'sha256sum', '%payload'])
    assert result.returncode == 0, result.stderr
    expected = hashlib.sha256(data).hexdigest()
    assert scripted.requests[-1].body.startswith(
        ('%s  blob.bin\n' % expected).encode())
    assert (job_dir / 'blob.bin').read_bytes() == data


# Importing ###################################################################

def test_importing_webjob_imports_nothing_but_os_and_sys():
    code = ('import sys; sys.path.insert(0, %r); before = set(sys.modules)\n'
            'import webjob\n'
            'print(sorted(set(sys.modules) - before - {"webjob"}))' % HERE)
    out = subprocess.run([sys.executable, '-I', '-c', code],
                         stdout=subprocess.PIPE)
    assert out.stdout == b'[]\n'
