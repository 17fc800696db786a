"""Hostile clients and deployments that lie, against nph_webjob.py.

In process: the standalone front end's StandaloneServer and
StandaloneHandler answer connections handed to them over a socketpair, and
the application runs through process_request.  Over loopback: a real
'nph_webjob.py serve' for what only a whole process shows (its memory, its
threads, its htpasswd file, its command line).
"""

import os
import re
import socket
import subprocess
import sys
import threading

import pytest

import nph_webjob
from conftest import (CGI_PATH, LOOPBACK, NPH_WEBJOB, make_server_root,
                      read_log_lines, wait_for_lines, write_file)

QUERY = ('VERSION=webjob-1.0.0&SYSTEM=Linux&CLIENTID=%s&FILENAME=%s'
         '&RUNTYPE=snapshot')
#: One log line: DateTime (two tokens), ten single-token fields, '--', text.
LOG_LINE = re.compile(
    r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (?P<job_id>\S+) (?P<user>\S+) '
    r'(?P<addr>\S+) (?P<method>\S+) (?P<client_id>\S+) (?P<filename>\S+) '
    r'(?P<length>\S+) (?P<server_length>\d+) (?P<duration>\d+) '
    r'(?P<status>\d{3}) --(?: (?P<message>[ -~]*))?\Z')


def get_request(client='client_1', filename='hostname.sh', extra=''):
    return ('GET %s?%s HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n'
            % (CGI_PATH, QUERY % (client, filename), extra)).encode()


def exchange(server, data):
    """Hand one connection to server in process, send data, close our
    side, and return everything it answered."""
    ours, theirs = socket.socketpair()
    sender = threading.Thread(target=send_quietly, args=(ours, data))
    sender.start()
    thread = server.start_connection(theirs, ('192.0.2.5', 4242))
    chunks = []
    ours.settimeout(60)
    while True:
        try:
            chunk = ours.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    sender.join(60)
    thread.join(60)
    ours.close()
    return b''.join(chunks)


def send_quietly(sock, data):
    """Send what the peer takes; a server may close before reading it all."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def statuses(reply):
    """The status of each response in reply (bodies here end in newlines)."""
    return [int(code) for code in re.findall(br'(?:^|\n)HTTP/1\.1 (\d{3}) ',
                                             reply)]


@pytest.fixture
def site(server_root):
    return nph_webjob.load_site(None, overrides={
        'BaseDirectory': str(server_root), 'RequireUser': False})


@pytest.fixture
def server(site):
    """A StandaloneServer without a socket: connections are handed to it."""
    return nph_webjob.StandaloneServer(site)


def log_entries(root, count):
    lines = wait_for_lines(os.path.join(str(root), 'logfiles',
                                        'nph-webjob.log'), count)
    entries = [LOG_LINE.match(line) for line in lines]
    assert all(entries), lines
    return entries


# Requests http.server used to get wrong ####################################

@pytest.mark.parametrize('data, status', [
    (b'GET /' + b'a' * 9000 + b' HTTP/1.1\r\n\r\n', 414),
    (get_request(extra='X-Big: %s\r\n' % ('b' * 8000)) * 0 +
     b'GET / HTTP/1.1\r\n' + b'X-Big: b\r\n' * 70 + b'\r\n', 431),
    (b'GET / HTTP/1.1\r\n' + (b'X-Big: ' + b'b' * 4000 + b'\r\n') * 9 +
     b'\r\n', 431),
    (b'GET / HTTP/2.0\r\n\r\n', 505),
    (b'GET / HTTX/1.1\r\n\r\n', 400),
    (b'GET /\r\n\r\n', 400),
    (b'GET  / HTTP/1.1\r\n\r\n', 400),
    (b'GET http://evil/ HTTP/1.1\r\n\r\n', 400),
    (b'GET /\x7f HTTP/1.1\r\n\r\n', 400),
    (b'G\xc3T / HTTP/1.1\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nNo colon here\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nX: a\rb\r\n\r\n', 400),
], ids=['414', '431-lines', '431-bytes', '505', 'not-http', 'http-0.9',
        'two-spaces', 'absolute-form', 'control-in-target', 'non-ascii',
        'folded', 'no-colon', 'nul-in-value', 'bare-cr'])
def test_refused_heads_get_a_status_line_and_a_log_line(server, server_root,
                                                        data, status):
    reply = exchange(server, data)
    assert statuses(reply) == [status], reply[:200]
    reason = nph_webjob.HTTP_REASONS[status].encode()
    assert reply.startswith(b'HTTP/1.1 %d %s\r\n' % (status, reason))
    assert b'Connection: close\r\n' in reply and b'<html' not in reply
    entry = log_entries(server_root, 1)[-1]
    assert int(entry.group('status')) == status


def test_space_before_the_colon_smuggles_nothing(server, server_root):
    """RFC 9112 5.1: refused, and what follows is never run as a request."""
    second = get_request()
    data = (b'GET %s?%s HTTP/1.1\r\nHost: x\r\nContent-Length : %d\r\n\r\n'
            % (CGI_PATH.encode(), (QUERY % ('client_1', 'hostname.sh'))
               .encode(), len(second))) + second
    reply = exchange(server, data)
    assert statuses(reply) == [400]
    assert [e.group('status') for e in log_entries(server_root, 1)] == ['400']


def test_head_cut_off_is_logged(server, server_root):
    reply = exchange(server, b'GET /cgi-client/nph-webjob.cgi?VERS')
    assert statuses(reply) == [400]    # the peer may still read (half-close)
    entry = log_entries(server_root, 1)[-1]
    assert (entry.group('status'), entry.group('method')) == ('400', 'GET')
    assert 'cut off' in entry.group('message')


def test_silent_connection_leaves_no_log_line(server, server_root):
    assert exchange(server, b'') == b''
    assert exchange(server, b'\r\n\r\n') == b''
    assert read_log_lines(server_root) == []


def test_pipelined_requests_each_get_an_answer_and_a_line(server,
                                                          server_root):
    one = get_request().replace(b'Connection: close\r\n', b'')
    reply = exchange(server, one + one + get_request(filename='none.sh'))
    assert statuses(reply) == [200, 200, 404]
    assert len(log_entries(server_root, 3)) == 3


def test_expect_100_continue_gets_an_interim_answer(server, server_root):
    body = b'out\n'
    data = ('PUT %s?%s&STDOUT_LENGTH=4&STDERR_LENGTH=0&STDENV_LENGTH=0 '
            'HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: '
            '4\r\nConnection: close\r\n\r\n' % (
                CGI_PATH, QUERY % ('client_1', 'hostname.sh'))).encode()
    reply = exchange(server, data + body)
    assert reply.startswith(b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK')


# Log fields ##################################################################

@pytest.mark.parametrize('method', ['-', '--', '-x', "~'"])
def test_no_log_field_reads_as_empty_or_as_the_separator(server, server_root,
                                                         method):
    data = get_request().replace(b'GET ', method.encode() + b' ', 1)
    assert statuses(exchange(server, data)) == [405]
    entry = log_entries(server_root, 1)[-1]
    field = entry.group('method')
    assert field not in ('-', '--') and not field.startswith('-')
    assert field.replace('\\x2d', '-') == method


def test_a_huge_request_writes_a_small_log_line(server, server_root):
    data = get_request(extra='Content-Length: %s\r\nJob-Id: %s\r\n' % (
        '9' * 12000, 'j' * 12000))
    assert statuses(exchange(server, data)) == [200]
    line = read_log_lines(server_root, 1)[-1]
    assert len(line) < 1024, len(line)


def test_log_field_rule():
    field = nph_webjob.log_field
    assert [field(v) for v in ('', None, '-', '--x', 'a b', 'a\\b', '\xe9',
                               'ok-1')] == [
        '-', '-', '\\x2d', '\\x2d-x', 'a\\x20b', 'a\\x5cb', '\\xe9', 'ok-1']
    assert len(field('x' * 100000)) == nph_webjob.MAX_LOG_FIELD


# Names #######################################################################

@pytest.mark.parametrize('client', ['-client', 'a_20200101000000_00001_b',
                                    'a_20200101000000_00001'])
def test_client_ids_that_would_make_names_lie_are_450(server, server_root,
                                                      client):
    assert statuses(exchange(server, get_request(client))) == [450]


def test_client_id_rule_keeps_ordinary_ids():
    for client in ('client_1', 'host-01.example', 'a_2020_00001_b',
                   '20200101000000_00001_b', 'a_20200101000000_000011'):
        assert nph_webjob.is_client_id(client), client


# What an administrator left in profiles/ and logfiles/ ######################

@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / 'outside'
    folder.mkdir()
    write_file(folder / 'secret', b'#!/bin/sh\necho secret\n')
    return folder


def test_link_in_profiles_to_outside_is_not_served(server, server_root,
                                                   outside):
    commands = server_root / 'profiles' / 'client_1' / 'commands'
    os.symlink(str(outside / 'secret'), str(commands / 'leak.sh'))
    os.mkdir(str(server_root / 'profiles' / 'client_2'))
    os.symlink(str(outside), str(server_root / 'profiles' / 'client_2' /
                                 'commands'))
    reply = exchange(server, get_request(filename='leak.sh'))
    assert statuses(reply) == [457] and b'secret' not in reply
    reply = exchange(server, get_request('client_2', 'secret'))
    assert statuses(reply) == [457] and b'secret' not in reply


def test_link_inside_base_directory_is_served(server, server_root):
    commands = server_root / 'profiles' / 'client_1' / 'commands'
    os.symlink(os.path.join('..', '..', 'common', 'commands', 'common.sh'),
               str(commands / 'shared.sh'))
    assert statuses(exchange(server, get_request(filename='shared.sh'))) == \
        [200]


def test_signature_link_to_outside_is_not_read(server, server_root, outside):
    write_file(outside / 'sig', b'QUJD\n')
    os.symlink(str(outside / 'sig'), str(
        server_root / 'profiles' / 'client_1' / 'commands' / 'hostname.sh.sig'))
    reply = exchange(server, get_request())
    assert statuses(reply) == [200] and b'WebJob-Payload-Signature' not in reply


@pytest.mark.parametrize('name', ['fifo.sh', 'hostname.sh.sig'])
def test_fifo_in_profiles_does_not_hang_a_handler(server, server_root, name):
    os.mkfifo(str(server_root / 'profiles' / 'client_1' / 'commands' / name))
    filename = 'fifo.sh' if name == 'fifo.sh' else 'hostname.sh'
    assert statuses(exchange(server, get_request(filename=filename))) == \
        [457 if name == 'fifo.sh' else 200]


def test_linked_log_is_not_appended_to(server, server_root, outside, capfd):
    target = outside / 'log'
    write_file(target, b'')
    os.symlink(str(target), str(server_root / 'logfiles' / 'nph-webjob.log'))
    assert statuses(exchange(server, get_request())) == [200]
    assert target.read_bytes() == b''
    assert 'log unavailable' in capfd.readouterr().err


# Authentication ##############################################################

def test_unknown_user_costs_the_same_work_as_a_known_one(tmp_path,
                                                         monkeypatch):
    """The stored hash of a real entry is checked for an unknown user too."""
    passwords = tmp_path / 'htpasswd'
    subprocess.run(['htpasswd', '-cbm', str(passwords), 'client_1', 'pw'],
                   check=True, stderr=subprocess.PIPE)
    auth = nph_webjob.Authentication(htpasswd=str(passwords))
    checked = []
    real = nph_webjob.check_htpasswd_password
    monkeypatch.setattr(nph_webjob, 'check_htpasswd_password',
                        lambda stored, password: checked.append(stored) or
                        real(stored, password))
    assert auth.check_password('client_1', 'pw')
    assert not auth.check_password('nobody', 'pw')
    assert checked[0] == checked[1] and checked[0].startswith('$apr1$')


def test_htpasswd_is_read_again_when_it_changes(tmp_path):
    passwords = str(tmp_path / 'htpasswd')
    subprocess.run(['htpasswd', '-cbm', passwords, 'client_1', 'pw'],
                   check=True, stderr=subprocess.PIPE)
    auth = nph_webjob.Authentication(htpasswd=passwords)
    assert auth.check_password('client_1', 'pw')
    subprocess.run(['htpasswd', '-D', passwords, 'client_1'], check=True,
                   stderr=subprocess.PIPE)
    assert not auth.check_password('client_1', 'pw')
    os.unlink(passwords)
    assert not auth.check_password('client_1', 'pw')


def test_revoking_a_client_needs_no_restart(tmp_path, standalone_server):
    passwords = str(tmp_path / 'htpasswd')
    for flag, user in (('-cbm', 'client_1'), ('-bm', 'client_2')):
        subprocess.run(['htpasswd', flag, passwords, user, 'pw'], check=True,
                       stderr=subprocess.PIPE)
    server = standalone_server(args=['--htpasswd', passwords])
    auth = 'Authorization: Basic Y2xpZW50XzE6cHc=\r\n'     # client_1:pw
    assert statuses(send(server.port, get_request(extra=auth))) == [200]
    subprocess.run(['htpasswd', '-D', passwords, 'client_1'], check=True,
                   stderr=subprocess.PIPE)
    assert statuses(send(server.port, get_request(extra=auth))) == [401]
    assert server.proc.poll() is None


def send(port, data):
    with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
        sock.sendall(data)
        return b''.join(iter(lambda: sock.recv(65536), b''))


# A whole server under hostile connections ####################################

def vm_rss_kib(pid):
    with open('/proc/%d/status' % pid) as handle:
        for line in handle:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])


def test_huge_unauthenticated_heads_do_not_grow_the_server(standalone_server):
    """Twenty connections sending 99 header lines of 64 KB each: each is
    refused at MAX_HEAD bytes, and the server's memory stays where it was."""
    server = standalone_server()
    assert statuses(send(server.port, get_request())) == [200]
    before = vm_rss_kib(server.proc.pid)
    head = b'GET / HTTP/1.1\r\n' + (b'X-Fill: ' + b'f' * 65536 + b'\r\n') * 99
    senders = []
    for _ in range(20):
        sock = socket.create_connection((LOOPBACK, server.port), timeout=60)
        thread = threading.Thread(target=send_quietly, args=(sock, head))
        thread.start()
        senders.append((sock, thread))
    lines = server.log_lines(21)
    after = vm_rss_kib(server.proc.pid)
    for sock, thread in senders:
        thread.join(60)
        sock.close()
    assert sorted(line.split()[11] for line in lines) == ['200'] + \
        ['431'] * 20
    assert after - before < 16 * 1024, (before, after)


def test_idle_and_slow_connections_do_not_stop_a_client(standalone_server):
    """Two hundred connections that say nothing or stop mid-head: a normal
    client is still served, and each stalled one is logged when it ends
    (400 when it closes, or 408 should its head outlive HEAD_TIME_LIMIT)."""
    server = standalone_server()
    stalled = []
    for number in range(200):
        sock = socket.create_connection((LOOPBACK, server.port), timeout=60)
        if number % 2:
            sock.sendall(b'GET /cgi-client/nph-webjob.cgi?VERSION=')
        stalled.append(sock)
    wait_for(lambda: accept_queue(server.port) == 0)   # all 200 taken
    assert statuses(send(server.port, get_request())) == [200]
    for sock in stalled:
        sock.close()
    lines = server.log_lines(101)
    assert sorted(line.split()[11] for line in lines)[0] == '200'
    assert set(line.split()[11] for line in lines[1:]) <= {'200', '400',
                                                          '408'}
    assert len(lines) == 101


def accept_queue(port):
    """Connections waiting to be accepted on a loopback listening port (the
    LISTEN line's rx_queue in /proc/net/tcp)."""
    with open('/proc/net/tcp') as handle:
        for line in handle.readlines()[1:]:
            fields = line.split()
            if fields[3] == '0A' and int(fields[1].split(':')[1], 16) == port:
                return int(fields[4].split(':')[1], 16)
    raise AssertionError('nothing listens on port %d' % port)


def wait_for(condition, limit=60.0):
    """Until condition() holds (a deadline only bounds a failing test)."""
    import time
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, 'condition never held'
        time.sleep(0.02)


# Command line and triggers ###################################################

def test_command_line_has_a_last_resort_handler(monkeypatch, capsys):
    def broken(command, argv):
        raise RuntimeError('unexpected')
    monkeypatch.setattr(nph_webjob, 'run_locker_tool', broken)
    assert nph_webjob.main(['verify']) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err
    assert 'internal error: RuntimeError: unexpected' in err


def test_trigger_log_keeps_the_first_line_of_stderr(server_root):
    site = nph_webjob.load_site(None, overrides={
        'BaseDirectory': str(server_root), 'RequireUser': False,
        'GetTriggerEnable': True,
        'GetTriggerCommandLine': 'echo "no such host" >&2; echo more >&2; '
                                 'exit 3'})
    exchange_ = nph_webjob.process_request({
        'REQUEST_METHOD': 'GET', 'QUERY_STRING': QUERY % (
            'client_1', 'hostname.sh')}, None, site)
    exchange_.body.close()
    nph_webjob.run_triggers(exchange_)
    lines = wait_for_lines(site.trigger_log_path, 2)
    assert lines[1].endswith('-- Exit status (3); stderr: no such host')


def test_get_hook_failure_logs_the_first_line_of_stderr(server_root):
    site = nph_webjob.load_site(None, overrides={
        'BaseDirectory': str(server_root), 'RequireUser': False,
        'GetHookEnable': True,
        'GetHookCommandLine': 'echo "bad input" >&2; echo more >&2; exit 2'})
    exchange_ = nph_webjob.process_request({
        'REQUEST_METHOD': 'GET', 'QUERY_STRING': QUERY % (
            'client_1', 'hostname.sh')}, None, site)
    assert exchange_.status == 457
    assert exchange_.message.endswith('exit status (2): bad input')


def test_serve_with_a_bad_option_value_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, NPH_WEBJOB, 'serve', '--root',
                             str(make_server_root(tmp_path / 'r')),
                             '--htpasswd', str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.count(b'\n') == 1 and b'Traceback' not in \
        result.stderr
