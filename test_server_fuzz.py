"""Fuzzing the standalone server's request path, with a fixed seed.

Each case is one connection carrying a request built from what webjob.py
sends, changed in one way (request line, query, headers, lengths, methods,
encodings, names) or in random bytes.  A case knows the status it must get
when its change decides it.  For every case: no traceback, a log line for
every answer, log fields that cannot be forged, and nothing read or written
outside BaseDirectory, where an administrator has left links in profiles/
and incoming/ pointing outside it.

In process, 100,000 cases go through StandaloneHandler over socketpairs;
over loopback, a few thousand through a real 'nph_webjob.py serve'.
"""

import os
import random
import re
import socket

import pytest

import nph_webjob
from conftest import CGI_PATH, LOOPBACK, wait_for_lines, write_file

SEED = 20261201
IN_PROCESS_CASES = 100000
SOCKET_CASES = 3000
STAMP_EPOCH = 1796000000            # the in-process site's fixed clock
SECRET = b'outside-secret-7f3a'

#: Statuses a fuzzed request may get; 500 and 550 would be server faults.
ALLOWED = {200, 251, 400, 404, 405, 408, 414, 431, 450, 451, 454, 455, 456,
           457, 505}

LOG_LINE = re.compile(
    r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (\S+ ){9}\d{3} --( [ -~]*)?\Z')

PARAMETERS = (('VERSION', 'webjob-1.0.0'), ('SYSTEM', 'x86_64+Linux+6.1'),
              ('CLIENTID', 'client_1'), ('FILENAME', 'hostname.sh'),
              ('RUNTYPE', 'snapshot'))
#: Values no parameter takes; then those no name (CLIENTID, FILENAME) takes.
BAD_VALUES = ('', '%zz', '%ff%fe', 'x' * 300, '%00', 'a%0ab', '%C3%A9', '%')
BAD_NAMES = ('../etc/passwd', 'a/b', '.hidden', '-rf', '%2e%2e%2fx', 'a+b')
BAD_VERSIONS = ('HTTP/1', 'http/1.1', 'HTTP/1.1x', 'HTTP/1.1 ', 'HTTP', '')
ODD_METHODS = ('DELETE', 'POST', 'HEAD', 'OPTIONS', 'TRACE', 'get', 'PUTX',
               'CONNECT', '-', '--', '-x', "~!#$%&'*+.^_`|")
NAMES = ('leak.sh', 'linked', 'missing.sh', 'common.sh', 'hostname.sh',
         'fifo.sh', 'secret')


def query_string(params):
    return '&'.join('%s=%s' % pair for pair in params)


def request(method='GET', params=PARAMETERS, version='HTTP/1.1',
            fields=(('Host', 'webjob.test'),), body=b'', target=None):
    head = '%s %s %s\r\n' % (method, target or '%s?%s' % (
        CGI_PATH, query_string(params)), version)
    head += ''.join('%s: %s\r\n' % pair for pair in fields)
    return head.encode('latin-1', 'surrogateescape') + b'\r\n' + body


def put_request(rng, runtype='linktest', lengths=None, body=None, fields=()):
    body = body if body is not None else bytes(
        rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    lengths = lengths or (len(body), 0, 0)
    params = [(n, 'linktest' if n == 'RUNTYPE' else v)
              for n, v in PARAMETERS] if runtype == 'linktest' \
        else list(PARAMETERS)
    params += [('STDOUT_LENGTH', lengths[0]), ('STDERR_LENGTH', lengths[1]),
               ('STDENV_LENGTH', lengths[2])]
    return request('PUT', params, fields=(('Host', 'x'),) + tuple(fields),
                   body=body)


def with_param(name, value):
    return [(n, value if n == name else v) for n, v in PARAMETERS]


def generate(rng):
    """(request bytes, expected status or None for 'any allowed')."""
    kind = rng.randrange(32)
    if kind == 0:
        return request(), 200
    if kind == 1:
        name = rng.choice(NAMES)
        return request(params=with_param('FILENAME', name)), {
            'leak.sh': 457, 'linked': 457, 'missing.sh': 404,
            'common.sh': 200, 'hostname.sh': 200, 'fifo.sh': 457,
            'secret': 404}[name]
    if kind == 2:
        return request(method=rng.choice(ODD_METHODS)), 405
    if kind == 3:
        name = rng.choice(PARAMETERS)[0]
        return request(params=with_param(name, rng.choice(
            BAD_VALUES + (BAD_NAMES if name in ('CLIENTID', 'FILENAME')
                          else ())))), 450
    if kind == 4:
        params = list(PARAMETERS)
        change = rng.randrange(3)
        if change == 0:
            params.append(rng.choice(PARAMETERS))
        elif change == 1:
            params.append(('EXTRA', '1'))
        else:
            params.pop(rng.randrange(len(params)))
        rng.shuffle(params)
        return request(params=params), 450
    if kind == 5:
        params = list(PARAMETERS)
        rng.shuffle(params)
        return request(params=[(n, ''.join(
            '%%%02X' % ord(c) if rng.random() < 0.3 else c for c in v))
            for n, v in params]), 200
    if kind == 6:
        return request(version=rng.choice(('HTTP/2.0', 'HTTP/1.2',
                                           'HTTP/3.0'))), 505
    if kind == 7:
        return request(version=rng.choice(BAD_VERSIONS)), 400
    if kind == 8:
        return request(fields=(('Host', 'x'), ('X-Odd ', 'y'),
                               ('Content-Length', '0'))), 400
    if kind == 9:
        return request(fields=(('Host', 'x'), ('X-Odd', 'y\r\n folded'))), \
            400
    if kind == 10:
        return request(fields=(('Host', 'x'), ('X-Odd', 'a%sb' % chr(
            rng.choice([0, 1, 8, 11, 12, 27, 127]))))), 400
    if kind == 11:
        return request(target='/%s' % ('a' * rng.randrange(8200, 12000))), \
            414
    if kind == 12:
        return request(fields=[('X-F%d' % n, 'v') for n in range(
            rng.randrange(65, 120))]), 431
    if kind == 13:
        return request(fields=[('X-F%d' % n, 'v' * 7000) for n in range(5)]),\
            431
    if kind == 14:
        return put_request(rng), 251
    if kind == 15:
        body = b'x' * rng.randrange(1, 40)
        return put_request(rng, lengths=(len(body) + 1, 0, 0), body=body), 456
    if kind == 16:
        data = put_request(rng)
        return data.replace(b'\r\n\r\n', b'\r\nContent-Length: 1\r\n'
                            b'Content-Length: 1\r\n\r\n', 1), 454
    if kind == 17:
        return put_request(rng, fields=(('Transfer-Encoding', 'chunked'),)), \
            454
    if kind == 18:
        body = b'y' * 10
        data = request('PUT', list(PARAMETERS) + [
            ('STDOUT_LENGTH', 10), ('STDERR_LENGTH', 0),
            ('STDENV_LENGTH', 0)], fields=(('Content-Length', rng.choice(
                ('', 'ten', '-10', '1e1', '0x0a', ' 1 0', '9' * 30))),),
            body=body)
        return data, 454
    if kind == 19:
        data = put_request(rng, lengths=(20, 0, 0), body=b'short')
        return data.replace(b'\r\n\r\n', b'\r\nContent-Length: 20\r\n\r\n',
                            1), 456
    if kind == 20:
        return request(params=with_param('CLIENTID', rng.choice(
            ('-client', 'a_20200101000000_00001_b', '.x', 'a+b', 'a%2fb')))), \
            450
    if kind == 21:
        return request(target='/%s' % ''.join(chr(rng.randrange(0x80, 0x100))
                                              for _ in range(4))), 400
    if kind == 22:
        return request(fields=(('Host', 'x'), ('Job-Id', rng.choice(
            ('-', '--', ' ', '../x', 'j' * 300, 'a b'))))), 200
    if kind == 23:
        return request(fields=(('Host', 'x'), ('Authorization', rng.choice(
            ('Basic', 'Basic !!!', 'Basic ' + 'A' * 5000, 'Bearer x'))))), 200
    if kind == 24 and rng.random() < 0.01:     # stores: fsyncs are slow
        out = b'out\n'
        env = b'Version=webjob 1.0.0\n'
        return put_request(rng, 'snapshot', (len(out), 0, len(env)),
                           out + env, (('Content-Length',
                                        str(len(out + env))),)), 200
    if kind == 25:
        return b'\r\n' * rng.randrange(1, 4) + request(), 200
    if kind == 26:
        return request().replace(b'\r\n', b'\n'), 200
    if kind == 27:
        data = request()
        return data[:rng.randrange(1, len(data) - 4)], 400
    data = bytearray(request() if kind % 2 else put_request(rng))
    for _ in range(rng.randrange(1, 6)):
        spot = rng.randrange(len(data))
        action = rng.randrange(3)
        if action == 0:
            data[spot] = rng.randrange(256)
        elif action == 1:
            del data[spot]
        else:
            data[spot:spot] = bytes([rng.choice(b' :\r\n%&=?/\\\x00\xff-')])
    return bytes(data), None


def add_content_length(data, expected):
    """PUT cases built above carry their Content-Length unless they test
    its absence or form; give the others one."""
    head, sep, body = data.partition(b'\r\n\r\n')
    if head.startswith(b'PUT ') and b'Content-Length' not in head and \
            b'Transfer-Encoding' not in head:
        head += b'\r\nContent-Length: %d' % len(body)
    return head + sep + body


def prepare(root, outside):
    """Links to outside BaseDirectory where an administrator might leave
    them, a FIFO, and group names in incoming/ that the fixed clock will
    ask for."""
    write_file(os.path.join(outside, 'secret'), SECRET)
    commands = os.path.join(root, 'profiles', 'client_1', 'commands')
    os.symlink(os.path.join(outside, 'secret'),
               os.path.join(commands, 'leak.sh'))
    os.symlink(outside, os.path.join(commands, 'linked'))
    os.symlink(outside, os.path.join(root, 'profiles', 'client_2'))
    os.mkfifo(os.path.join(commands, 'fifo.sh'))
    import time
    stamp = time.strftime('%Y%m%d%H%M%S', time.localtime(STAMP_EPOCH))
    for serial in range(1, 40):
        for ext in ('out', 'rdy'):
            os.symlink(os.path.join(outside, 'trap-%d.%s' % (serial, ext)),
                       os.path.join(root, 'incoming',
                                    'client_1_%s_%05d_hostname.sh.%s' % (
                                        stamp, serial, ext)))


def snapshot(folder):
    found = {}
    for top, subs, files in os.walk(folder):
        for name in subs + files:
            path = os.path.join(top, name)
            info = os.lstat(path)
            found[path] = (info.st_size, info.st_mtime_ns)
    return found


def check_log(lines, answers):
    """A line per answer, each of the 12 fields, none forged."""
    assert len(lines) == answers, (len(lines), answers)
    bad = []
    for line in lines:
        if not LOG_LINE.match(line):
            bad.append(line)
            continue
        fields = line.split(' ')[2:12]
        if any(f == '--' or (f.startswith('-') and f != '-') for f in fields):
            bad.append(line)
    assert bad == []


def check_case(data, expected, reply, failures):
    got = [int(code) for code in re.findall(
        br'(?:^|\n)HTTP/1\.1 (\d{3}) ', reply)]
    if SECRET in reply or any(code not in ALLOWED for code in got) or (
            expected is not None and got[:1] != [expected]):
        failures.append((data[:160], expected, got, reply[:160]))
    return len(got)


@pytest.fixture
def fuzz_site(tmp_path):
    root = str(tmp_path / 'base')
    outside = str(tmp_path / 'outside')
    os.makedirs(outside)
    for sub in ('incoming', 'logfiles', 'profiles/client_1/commands',
                'profiles/common/commands'):
        os.makedirs(os.path.join(root, sub))
    write_file(os.path.join(root, 'profiles/client_1/commands/hostname.sh'),
               b'#!/bin/sh\nhostname\n', 0o755)
    write_file(os.path.join(root, 'profiles/common/commands/common.sh'),
               b'#!/bin/sh\ndate\n', 0o755)
    prepare(root, outside)
    return root, outside


def test_fuzzed_requests_in_process(fuzz_site, capfd):
    root, outside = fuzz_site
    serials = iter(range(1, 1 << 30))
    site = nph_webjob.load_site(None, overrides={
        'BaseDirectory': root, 'RequireUser': False},
        next_serial=lambda: next(serials), clock=lambda: STAMP_EPOCH)
    server = nph_webjob.StandaloneServer(site)
    before = snapshot(outside)
    rng = random.Random(SEED)
    failures, answers = [], 0
    for number in range(IN_PROCESS_CASES):
        data, expected = generate(rng)
        data = add_content_length(data, expected)
        ours, theirs = socket.socketpair()
        try:
            ours.sendall(data)
            ours.shutdown(socket.SHUT_WR)
            try:
                nph_webjob.StandaloneHandler(
                    server, theirs, ('192.0.2.5', 4242)).handle()
            except Exception as exc:
                failures.append((data[:160], expected, 'raised', repr(exc)))
            theirs.close()
            reply = b''.join(iter(lambda: ours.recv(65536), b''))
        finally:
            ours.close()
            theirs.close()
        answers += check_case(data, expected, reply, failures)
        assert len(failures) < 20, failures
    assert failures == []
    log = os.path.join(root, 'logfiles', 'nph-webjob.log')
    check_log(wait_for_lines(log, answers), answers)
    assert snapshot(outside) == before
    err = capfd.readouterr().err
    assert 'Traceback' not in err and 'connection error' not in err


def test_fuzzed_requests_over_loopback(fuzz_site, standalone_server):
    root, outside = fuzz_site
    server = standalone_server(root=root)
    before = snapshot(outside)
    rng = random.Random(SEED + 1)
    failures, answers = [], 0
    for number in range(SOCKET_CASES):
        data, expected = generate(rng)
        data = add_content_length(data, expected)
        with socket.create_connection((LOOPBACK, server.port), 60) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass            # refused before it read everything
            chunks = []
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        answers += check_case(data, expected, b''.join(chunks), failures)
        assert len(failures) < 20, failures
    assert failures == []
    check_log(server.log_lines(answers), answers)
    assert snapshot(outside) == before
    assert 'Traceback' not in server.stderr()
    assert 'connection error' not in server.stderr()
