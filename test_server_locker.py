"""The locker under faults: a file is whole or absent, and verify says which.

verify and list on every kind of damage, a CGI terminated mid-upload, a
standalone server killed or stopped mid-upload, a disk that fills up (a
real tmpfs mounted for the test), and job ids that never repeat.  Helpers
for requests come from test_server.py; fixtures from conftest.py.
"""

import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

import nph_webjob
from conftest import (CGI_PATH, LOOPBACK, NPH_WEBJOB, free_port,
                      read_log_lines, stop_process, wait_for_lines,
                      wait_for_port, write_file)
from test_server import (ENV_RECORD, LOG_LINE, client_request, incoming,
                             make_site, put, put_query, query, read_reply,
                             send)


def run_tool(root, *args):
    """nph_webjob.py verify or list on root; the CompletedProcess."""
    return subprocess.run([sys.executable, NPH_WEBJOB] + list(args) +
                          ['--root', str(root)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120)


def verify_lines(root):
    """(exit status, stdout lines, stderr) of verify on root."""
    result = run_tool(root, 'verify')
    return (result.returncode, result.stdout.decode().splitlines(),
            result.stderr.decode())


def group_files(root, ext):
    return [n for n in incoming(root) if n.endswith('.' + ext)]


def stored_group(root):
    """Store one upload in process; its group name."""
    assert put(make_site(root))[0] == 200
    return group_files(root, 'rdy')[0][:-len('.rdy')]


def wait_for_file(folder, predicate, timeout=30.0, proc=None):
    """The first name in folder that predicate accepts, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        names = [n for n in os.listdir(str(folder)) if predicate(n)]
        if names:
            return names[0]
        if proc is not None and proc.poll() is not None:
            raise AssertionError('process exited (%s) first' % proc.returncode)
        if time.monotonic() > deadline:
            raise AssertionError('no such file in %s: %s' % (
                folder, os.listdir(str(folder))))
        time.sleep(0.01)     # poll interval while waiting on the file


def is_partial_out(name):
    return name.startswith('.') and name.endswith('.out')


def half_put(port, size=4 << 20, auth=None):
    """A connection that has sent a PUT's head and half of its out stream;
    (socket, the rest of the body)."""
    out = b'x' * size
    request = client_request('PUT', port, put_query(out, b'', ENV_RECORD),
                             out + ENV_RECORD, auth=auth)
    half = len(request) - len(ENV_RECORD) - size // 2
    sock = socket.create_connection((LOOPBACK, port), timeout=60)
    sock.sendall(request[:half])
    return sock, request[half:]


# verify: every file that is not part of a sealed group #######################

def test_verify_of_a_whole_locker_is_clean(server_root):
    stored_group(server_root)
    status, lines, err = verify_lines(server_root)
    assert (status, lines[-1], err) == (
        0, 'verify: 1 groups, 4 files in the manifest, 0 problems', '')


def test_a_lock_beside_a_tampered_group_does_not_hide_it(server_root):
    group = stored_group(server_root)
    write_file(server_root / 'incoming' / (group + '.out'), b'forged\n')
    write_file(server_root / 'incoming' / (group + '.lck'), b'')
    status, lines, _ = verify_lines(server_root)
    assert status == 1
    assert '%s.out: changed since upload (SHA-256 differs from the manifest)' \
        % group in lines
    assert '%s.lck: stale lock: no live process holds it (an upload that ' \
        'was killed)' % group in lines


def test_a_lock_held_by_a_live_process_is_an_upload_in_progress(server_root):
    import fcntl
    name = 'client_1_20240101000000_00001_x.sh'
    path = str(server_root / 'incoming' / (name + '.lck'))
    write_file(server_root / 'incoming' / ('.%s.out' % name), b'half')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        status, lines, _ = verify_lines(server_root)
    finally:
        os.close(fd)
    assert status == 0, lines
    assert lines == ['%s: upload in progress (a live process holds its lock)'
                     % name, 'verify: 1 groups, 0 files in the manifest, 0 '
                     'problems, 1 uploads in progress']
    status, lines, _ = verify_lines(server_root)
    assert status == 1
    assert '.%s.out: orphan temporary file of an upload that was killed' \
        % name in lines


def test_a_group_without_rdy_or_lock_is_incomplete(server_root):
    name = 'client_1_20240101000000_00001_x.sh'
    for ext in ('out', 'err'):
        write_file(server_root / 'incoming' / ('%s.%s' % (name, ext)), b'x')
    status, lines, _ = verify_lines(server_root)
    assert status == 1 and '%s: incomplete: no .rdy' % name in lines


def test_a_sealed_group_missing_a_stream_is_incomplete(server_root):
    name = 'client_1_20240101000000_00001_x.sh'
    for ext in ('out', 'rdy'):
        write_file(server_root / 'incoming' / ('%s.%s' % (name, ext)), b'x')
    status, lines, _ = verify_lines(server_root)
    assert status == 1
    assert '%s: incomplete: no .err' % name in lines
    assert '%s: incomplete: no .env' % name in lines


@pytest.mark.parametrize('name', ['notes.txt', 'evil.out', '.hidden',
                                  '.client_1_20240101000000_00001_x.sh.lck',
                                  'client_1_2024_00001_x.sh.out'])
def test_a_file_planted_under_another_name_is_reported(server_root, name):
    stored_group(server_root)
    write_file(server_root / 'incoming' / name, b'planted')
    status, lines, _ = verify_lines(server_root)
    assert status == 1
    assert '%s: not part of any group (planted or left behind)' % name \
        in lines


@pytest.mark.parametrize('ext', ['out', 'err', 'env', 'bad'])
def test_a_link_planted_under_a_temporary_name_is_passed_by(server_root,
                                                            tmp_path, ext):
    """The upload takes the next serial number instead of failing on (or
    writing through) the link, and verify reports the planted link."""
    outside = tmp_path / 'outside'
    write_file(outside, b'not evidence')

    def site():
        return make_site(server_root, next_serial=lambda: 1,
                         clock=lambda: 1700000000.0)
    assert put(site())[0] == 200
    first = group_files(server_root, 'rdy')[0][:-len('.rdy')]
    for name in incoming(server_root):
        os.unlink(str(server_root / 'incoming' / name))
    planted = '.%s.%s' % (first, ext)
    os.symlink(str(outside), str(server_root / 'incoming' / planted))
    assert put(site())[0] == 200
    stored = group_files(server_root, 'rdy')
    assert len(stored) == 1 and stored[0] != first + '.rdy', stored
    assert outside.read_bytes() == b'not evidence'
    status, lines, err = verify_lines(server_root)
    assert (status, err) == (1, '')
    assert [line for line in lines if line.startswith(planted + ':')], lines


@pytest.mark.parametrize('kind', ['dangling link', 'directory', 'fifo'])
def test_verify_and_list_report_a_non_file_named_like_a_group_file(
        server_root, kind):
    group = stored_group(server_root)
    path = str(server_root / 'incoming' / (group + '.err'))
    os.unlink(path)
    {'dangling link': lambda: os.symlink('/nonexistent/x', path),
     'directory': lambda: os.mkdir(path),
     'fifo': lambda: os.mkfifo(path)}[kind]()
    status, lines, err = verify_lines(server_root)
    assert (status, err) == (1, '')
    shown = {'dangling link': 'symbolic link', 'fifo': 'FIFO'}.get(kind, kind)
    assert '%s.err: not a regular file (%s)' % (group, shown) in lines
    listed = run_tool(server_root, 'list')
    assert (listed.returncode, listed.stderr) == (0, b'')
    assert listed.stdout.decode().split()[-2] == '-'      # ErrSize unknown


def test_verify_flags_a_job_id_stored_twice(server_root):
    site = make_site(server_root)
    for _ in range(2):
        assert put(site, HTTP_JOB_ID='server_1_1700000000_00001')[0] == 200
    first, second = [n[:-4] for n in group_files(server_root, 'rdy')]
    status, lines, _ = verify_lines(server_root)
    assert status == 1
    assert lines[:-1] == ['%s: job id server_1_1700000000_00001 repeats that '
                          'of %s' % (second, first)]


def test_verify_of_an_unreadable_incoming_is_one_line(tmp_path):
    status, lines, err = verify_lines(tmp_path / 'nowhere')
    assert status == 1 and lines == []
    assert err.startswith('nph_webjob: ') and len(err.splitlines()) == 1


def test_every_finding_kind_has_one_text():
    kinds = [row[0] for row in nph_webjob.FINDINGS]
    assert len(kinds) == len(set(kinds))
    assert nph_webjob.PROBLEM_KINDS == set(kinds) - {'in_progress'}


# The manifest names accepted groups only #####################################

@pytest.fixture
def small_disk(server_root):
    """incoming/ on a real 1 MiB tmpfs, unmounted afterwards (needs root);
    fill(free) leaves that many bytes free on it."""
    path = str(server_root / 'incoming')
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m,mode=0755',
                    'tmpfs', path], check=True)
    filler = os.path.join(path, '.filler')

    def fill(free):
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            for _ in range(1024):           # 4 MiB at most: the disk is 1
                os.write(fd, b'\0' * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        size = os.path.getsize(filler)
        os.truncate(filler, max(0, size - free))
        return filler

    try:
        yield fill
    finally:
        subprocess.run(['umount', path], check=True)


def test_disk_full_at_rdy_leaves_no_manifest_lines(server_root, small_disk):
    """The streams take the last free pages; sealing needs one more."""
    small_disk(8192)
    site = make_site(server_root)
    status, reply = put(site, out=b'o' * 8192, env=b'')
    assert status == 500
    assert incoming(server_root) == ['.filler']
    manifest = server_root / 'logfiles' / nph_webjob.MANIFEST_NAME
    assert not manifest.exists() or manifest.read_bytes() == b''
    message = LOG_LINE.match(read_log_lines(server_root, 1)[-1]).group(
        'message')
    assert 'No space left on device' in message
    assert verify_lines(server_root)[1][-1].endswith(', 1 problems')  # filler


def test_disk_full_is_answered_500_after_the_body_is_read(
        server_root, small_disk, standalone_server):
    """The server drains the refused body, so the client reads the 500
    instead of a reset."""
    small_disk(0)
    server = standalone_server(root=str(server_root))
    out = b"x" * (32 << 20)             # more than loopback buffers hold
    reply = send(server.port, client_request(
        'PUT', server.port, put_query(out, b'', ENV_RECORD), out + ENV_RECORD))
    assert reply.status == 500
    assert incoming(server_root) == ['.filler']
    assert 'No space left on device' in server.log_lines(1)[-1]


def test_client_reads_the_500_of_a_full_disk_not_a_broken_pipe(
        tmp_path, server_root, small_disk, standalone_server):
    """80 MiB is more than the server drains: it answers and closes, the
    client's send fails, and the client reads the answer all the same."""
    from test_client import assert_clean_error, run_webjob
    from test_deploy_end_to_end import server_cfg
    write_file(server_root / 'profiles/client_1/commands/big.sh',
               b'#!/bin/sh\nhead -c 83886080 /dev/zero\n', 0o755)
    small_disk(0)
    server = standalone_server(root=str(server_root))
    job_dir = tmp_path / 'job'
    job_dir.mkdir()
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir)
    result = run_webjob(['-e', '-f', cfg, 'big.sh'], timeout=300)
    assert_clean_error(result, 10, 'PutStage', 'Status = [500]')
    assert b'Broken pipe' not in result.stderr
    assert 'No space left on device' in server.log_lines(2)[-1]


# Faults: CGI terminated, server killed, server stopped #######################

def test_cgi_terminated_mid_put_removes_everything_and_logs(tmp_path,
                                                            server_root):
    cfg = write_file(tmp_path / 'nph-webjob.cfg', (
        'BaseDirectory = %s\nRequireUser = N\n' % server_root).encode())
    out = b'x' * (1 << 20)
    env = dict(os.environ, GATEWAY_INTERFACE='CGI/1.1', REQUEST_METHOD='PUT',
               SCRIPT_FILENAME='/cgi/nph-webjob.cgi', REMOTE_ADDR='192.0.2.9',
               QUERY_STRING=put_query(out, b'', ENV_RECORD),
               CONTENT_LENGTH=str(len(out) + len(ENV_RECORD)),
               WEBJOB_PROPERTIES_FILE=str(cfg))
    proc = subprocess.Popen([sys.executable, NPH_WEBJOB], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(out[:4096])
        proc.stdin.flush()
        wait_for_file(server_root / 'incoming', is_partial_out, proc=proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert (proc.returncode, stderr) == (0, b'')
    assert incoming(server_root) == []
    line = LOG_LINE.match(read_log_lines(server_root, 1)[-1])
    assert line.group('method') == 'PUT'
    assert 'Terminated by signal (15)' in line.group('message')
    # 456 when the signal ended the body's read, 500 when it hit a write
    assert line.group('status') in ('456', '500')
    assert stdout.startswith(b'HTTP/1.1 %s ' % line.group('status').encode())


def test_client_gone_mid_put_under_apache_leaves_nothing(apache_server):
    apache = apache_server(require_user=False)
    apache.clean()
    sock, rest = half_put(apache.port, auth=('client_1', 'secret-1'))
    try:
        wait_for_file(os.path.join(apache.root, 'incoming'), is_partial_out)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack('ii', 1, 0))
    finally:
        sock.close()                                    # a reset, mid-body
    line = LOG_LINE.match(apache.log_lines(1)[-1])
    assert line.group('status') in ('456', '500'), line.group(0)
    assert apache.incoming() == []


def test_leftovers_of_a_killed_server_are_reported_by_verify(
        standalone_server):
    server = standalone_server()
    sock, rest = half_put(server.port)
    with sock:
        name = wait_for_file(os.path.join(server.root, 'incoming'),
                             is_partial_out)
        server.stop(signal.SIGKILL)
    status, lines, _ = verify_lines(server.root)
    group = name[1:-len('.out')]
    assert status == 1
    assert '%s.lck: stale lock: no live process holds it (an upload that ' \
        'was killed)' % group in lines
    assert '%s: orphan temporary file of an upload that was killed' % name \
        in lines


def test_sigterm_lets_an_upload_in_flight_finish(standalone_server):
    server = standalone_server()
    idle = socket.create_connection((LOOPBACK, server.port), timeout=60)
    sock, rest = half_put(server.port)
    with sock, idle:
        wait_for_file(os.path.join(server.root, 'incoming'), is_partial_out)
        server.proc.send_signal(signal.SIGTERM)
        assert idle.recv(1) == b''          # an idle connection: closed
        with pytest.raises(OSError):        # no new connections
            socket.create_connection((LOOPBACK, server.port), timeout=5)
        sock.sendall(rest)
        reply = read_reply(sock.makefile('rb'))
    assert (reply.status, reply.field('Connection')) == (200, 'close')
    assert server.proc.wait(timeout=60) == 0
    assert len(server.incoming()) == 4
    assert verify_lines(server.root)[0] == 0


def test_connection_reset_mid_header_is_logged(standalone_server):
    server = standalone_server()
    sock = socket.create_connection((LOOPBACK, server.port), timeout=60)
    sock.sendall(b'PUT ' + CGI_PATH.encode() + b' HTTP/1.1\r\nHost: x\r\n')
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                    struct.pack('ii', 1, 0))
    sock.close()
    line = LOG_LINE.match(server.log_lines(1)[-1])
    assert line.group('status') == '400'
    assert 'cut off' in line.group('message')
    assert 'Connection reset' in line.group('message')


# Job ids never repeat ########################################################

def get_job_id(server):
    reply = send(server.port, client_request('GET', server.port, query()))
    assert reply.status == 200
    return reply.field('Job-Id')


def test_job_ids_continue_across_a_restart_in_the_same_second(
        standalone_server, server_root):
    ids = []
    for _ in range(2):
        server = standalone_server(root=str(server_root))
        ids.append(get_job_id(server))
        assert server.stop() == 0
    assert ids[0] != ids[1]
    serials = [int(job_id.rsplit('_', 1)[1]) for job_id in ids]
    assert serials[1] > serials[0]


def test_two_servers_with_the_same_server_id_never_repeat_an_id(
        standalone_server, server_root):
    """Each takes blocks of serial numbers from the locker's serial file."""
    servers = [standalone_server(root=str(server_root)) for _ in range(2)]
    ids = [get_job_id(server) for server in servers for _ in range(3)]
    assert len(set(ids)) == 6
    other = standalone_server(root=str(server_root),
                              args=['--server-id', 'server_2'])
    assert get_job_id(other).startswith('server_2_')


def test_the_default_server_id_is_warned_about(standalone_server):
    server = standalone_server()
    assert 'warning: ServerId is the default (server_1)' in server.stderr()
    named = standalone_server(args=['--server-id', 'lab-7'])
    get_job_id(named)
    assert 'warning' not in named.stderr()


def test_bad_server_id_on_the_command_line_is_a_usage_error(capsys):
    assert nph_webjob.main(['serve', '--server-id', '../x']) == 2
    assert '--server-id' in capsys.readouterr().err
