"""UploadMode=resumable and UploadMode=streamed against nph_webjob.py serve
with PartialUploadEnable=Y, through a relay of the tests' own that cuts the
connection at a byte offset or holds it while the server is killed and
restarted.  Every trial ends with the job stored exactly once, byte for
byte, and `verify` clean, or with exit code 10 and the output kept.
"""

import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest

from conftest import (LOOPBACK, NEWEST_PY, NPH_WEBJOB, OLDEST_PY, WEBJOB,
                      close_listener, free_port, make_server_root, read_log_lines,
                      stop_process, wait_for_port, write_file)

SEED = 1016                     # fixed: the same cut points on every run
TRIALS = 100                    # cut points per kind
WORKERS = 4                     # trials at once (each waits on the server)
SEGMENT = 65536                 # UploadSegmentSize for the trials
#: A program whose stdout (about 290 KB) and stderr are known in advance.
PROGRAM = b'#!/bin/sh\nseq 1 50000\nseq 1 3000 >&2\n'
OUT = b''.join(b'%d\n' % n for n in range(1, 50001))
ERR = b''.join(b'%d\n' % n for n in range(1, 3001))
PUT_STAGE = 10


# A relay that cuts or holds ##################################################

class Relay(object):
    """Forwards loopback connections to the server.  arm(cut) closes the
    connection in flight once cut bytes (both directions, all connections)
    have passed, once; hold(at) instead stops forwarding there until
    release(), so the test can kill the server meanwhile."""

    def __init__(self, port):
        self.port = port
        self.lock = threading.Lock()
        self.passed = 0
        self.cut = self.hold_at = None
        self.held = threading.Event()
        self.go = threading.Event()
        self.listener = socket.socket()
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(64)
        self.url = 'http://%s:%d/cgi-client/nph-webjob.cgi' % (
            LOOPBACK, self.listener.getsockname()[1])
        self.thread = threading.Thread(target=self.accept)
        self.thread.daemon = True
        self.thread.start()

    def arm(self, cut=None, hold_at=None):
        with self.lock:
            self.passed = 0
            self.cut, self.hold_at = cut, hold_at
            self.held.clear()
            self.go.clear()

    def release(self):
        self.go.set()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection((LOOPBACK, self.port),
                                                  timeout=30)
            except OSError:
                client.close()
                continue
            pair = (client, server)
            for source, sink in ((client, server), (server, client)):
                thread = threading.Thread(target=self.pump,
                                          args=(source, sink, pair))
                thread.daemon = True
                thread.start()

    def budget(self, count):
        """How many of count bytes may pass now: all, or fewer at a cut or
        hold point (which then fires)."""
        with self.lock:
            for name in ('cut', 'hold_at'):
                point = getattr(self, name)
                if point is not None and self.passed + count >= point:
                    setattr(self, name, None)
                    allowed = point - self.passed
                    self.passed = point
                    return allowed, name
            self.passed += count
            return count, None

    def pump(self, source, sink, pair):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                allowed, event = self.budget(len(data))
                sink.sendall(data[:allowed])
                if event == 'hold_at':
                    self.held.set()
                    self.go.wait(60)
                if event is not None:
                    break
        except OSError:
            pass
        for sock in pair:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self):
        close_listener(self.listener, self.thread)


def run_held(relay, argv, while_held):
    """Run argv until the armed relay holds its upload, call while_held(),
    release the relay, and return the finished CompletedProcess."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert relay.held.wait(120), 'the hold point was never reached'
        while_held()
        relay.release()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# The server ##################################################################

class Server(object):
    """nph_webjob.py serve on a fixed port, restartable in place."""

    def __init__(self, work):
        self.root = make_server_root(os.path.join(work, 'server'))
        write_file(os.path.join(self.root, 'profiles', 'client_1', 'commands',
                                'seq.sh'), PROGRAM, 0o755)
        self.config = write_file(os.path.join(work, 'nph-webjob.cfg'),
                                 b'PartialUploadEnable = Y\n')
        self.log = os.path.join(work, 'serve.log')
        self.port = free_port()
        self.proc = None
        self.start()

    def start(self):
        with open(self.log, 'ab') as log:
            self.proc = subprocess.Popen(
                [sys.executable, NPH_WEBJOB, 'serve', '--root', self.root,
                 '--port', str(self.port), '--config', self.config],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_for_port(LOOPBACK, self.port, proc=self.proc)

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    @property
    def url(self):
        return 'http://%s:%d/cgi-client/nph-webjob.cgi' % (LOOPBACK, self.port)

    def groups(self):
        return sorted(name[:-4] for name in os.listdir(os.path.join(
            self.root, 'incoming')) if name.endswith('.rdy') and
            not name.startswith('.'))     # not a .rdy being written

    def read(self, group, ext):
        with open(os.path.join(self.root, 'incoming', group + '.' + ext),
                  'rb') as handle:
            return handle.read()

    def partial_folder(self):
        return os.path.join(self.root, 'incoming', '.partial')

    def verify(self):
        return subprocess.run([sys.executable, NPH_WEBJOB, 'verify', '--root',
                               self.root], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=120)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    work = str(tmp_path_factory.mktemp('stream-server'))
    server = Server(work)
    yield server
    stop_process(server.proc)


@pytest.fixture(scope='module')
def relay(server):
    relay = Relay(server.port)
    yield relay
    relay.close()


def job_command(server, folder, put_url, mode, **controls):
    """The argv of 'webjob.py -e -f cfg seq.sh' with a config in folder's
    parent; GET straight from the server, PUT to put_url."""
    os.makedirs(folder)
    config = dict(ClientId='client_1', URLGetURL=server.url,
                  URLPutURL=put_url, TempDirectory=folder, UploadMode=mode,
                  UploadSegmentSize=SEGMENT, PutTimeLimit=120)
    config.update(controls)
    path = folder + '.cfg'
    write_file(path, ''.join('%s=%s\n' % pair for pair in sorted(
        config.items())).encode())
    return [sys.executable, '-I', '-S', WEBJOB, '-e', '-f', path, 'seq.sh']


def run_job(server, folder, put_url, mode, **controls):
    """Run one job (see job_command) to its end."""
    return subprocess.run(job_command(server, folder, put_url, mode,
                                      **controls), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=300)


def local_env(folder):
    names = [n for n in os.listdir(folder) if n.endswith('.env')]
    assert len(names) == 1, os.listdir(folder)
    with open(os.path.join(folder, names[0]), 'rb') as handle:
        return handle.read()


def assert_stored_once(server, result, folder):
    """The job is exactly one group (found by the job id in its .rdy), byte
    for byte what the program wrote and the .env kept locally."""
    assert result.returncode == 0, result.stderr.decode()
    env = local_env(folder)
    job_id = [line[4:] for line in env.decode().splitlines()
              if line.startswith('Jid=')][0]
    found = [group for group in server.groups()
             if server.read(group, 'rdy') == ('Jid=%s\n' % job_id).encode()]
    assert len(found) == 1, (job_id, found)
    assert server.read(found[0], 'out') == OUT
    assert server.read(found[0], 'err') == ERR
    assert server.read(found[0], 'env') == env


def assert_verify_clean(server):
    result = server.verify()
    assert result.returncode == 0, result.stdout.decode()


def measure(server, relay, tmp_path, mode):
    """Bytes through the relay for one uncut job of this mode."""
    relay.arm()
    folder = str(tmp_path / ('uncut-' + mode))
    result = run_job(server, folder, relay.url, mode)
    assert_stored_once(server, result, folder)
    return relay.passed


def test_resumable_job_through_the_relay_is_one_put_stage(server, relay,
                                                          tmp_path):
    """Uncut: one HEAD and one PATCH; the group matches the local copy."""
    before = len(read_log_lines(server.root))
    assert measure(server, relay, tmp_path, 'resumable') > len(OUT)
    methods = [line.split()[5] for line in read_log_lines(
        server.root, before + 3)[before:]]
    assert methods == ['GET', 'HEAD', 'PATCH']
    assert_verify_clean(server)


@pytest.mark.parametrize('mode', ['resumable', 'streamed'])
def test_cut_at_random_byte_offsets_every_job_is_stored_once(server, relay,
                                                             tmp_path, mode):
    """TRIALS cuts at random byte offsets of the PUT stage's traffic (the
    relays count both directions, so lost answers are among them), run
    WORKERS at a time, each through a relay of its own."""
    import concurrent.futures
    total = measure(server, relay, tmp_path, mode)
    rand = random.Random('%s-%s' % (SEED, mode))
    cuts = [rand.randrange(1, total) for trial in range(TRIALS)]
    relays = [relay] + [Relay(server.port) for _ in range(WORKERS - 1)]

    def work(worker):
        for trial in range(worker, TRIALS, WORKERS):
            relays[worker].arm(cut=cuts[trial])
            folder = str(tmp_path / ('%s-%d' % (mode, trial)))
            result = run_job(server, folder, relays[worker].url, mode)
            try:
                assert relays[worker].cut is None, 'cut never reached'
                assert_stored_once(server, result, folder)
            except AssertionError as exc:
                raise AssertionError('trial %d, cut at byte %d of %d: %s'
                                     % (trial, cuts[trial], total, exc))
        return worker
    try:
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            for done in pool.map(work, range(WORKERS)):
                pass
    finally:
        for extra in relays[1:]:
            extra.close()
    assert_verify_clean(server)


@pytest.mark.parametrize('mode', ['resumable', 'streamed'])
def test_server_killed_and_restarted_mid_upload(server, relay, tmp_path,
                                                mode):
    """The relay holds the upload half way; the server is killed (SIGKILL)
    and started again; the client resumes from what the new server holds."""
    total = measure(server, relay, tmp_path, mode)
    relay.arm(hold_at=total // 2)
    folder = str(tmp_path / ('restart-' + mode))
    def restart():
        server.kill()
        server.start()
    result = run_held(relay, job_command(server, folder, relay.url, mode),
                      restart)
    assert_stored_once(server, result, folder)
    assert_verify_clean(server)


def test_an_original_server_gets_the_plain_put(tmp_path, standalone_server):
    """No PartialUploadEnable: the HEAD is refused (405) and the job goes up
    as the original's single PUT, stored once."""
    original = standalone_server()
    write_file(os.path.join(str(original.root), 'profiles', 'client_1',
                            'commands', 'seq.sh'), PROGRAM, 0o755)
    for mode in ('resumable', 'streamed'):
        folder = str(tmp_path / mode)
        result = run_job(original, folder, original.url + 'cgi-client/x.cgi',
                         mode)
        assert result.returncode == 0, result.stderr.decode()
    methods = [line.split()[5] for line in original.log_lines(6)]
    assert methods == ['GET', 'HEAD', 'PUT'] * 2
    rdy = [n for n in original.incoming() if n.endswith('.out')]
    for name in rdy:
        with open(os.path.join(str(original.root), 'incoming', name),
                  'rb') as handle:
            assert handle.read() == OUT


def test_streamed_job_stages_no_output_file(server, tmp_path):
    """Only the .env is left in TempDirectory: stdout and stderr went to the
    server in segments, each removed once the server held it."""
    folder = str(tmp_path / 'job')
    result = run_job(server, folder, server.url, 'streamed')
    assert_stored_once(server, result, folder)
    assert sorted(n.rsplit('.', 1)[-1] for n in os.listdir(folder)) == \
        ['env', 'sh']


def test_streamed_upload_refused_mid_way_keeps_the_rest(server, tmp_path):
    """A permanent refusal (the server's cap, 455) ends the upload: exit 10,
    the message names the segments kept in TempDirectory."""
    folder = str(tmp_path / 'job')
    override = os.path.join(os.path.dirname(server.config), 'clients',
                            'client_1')
    os.makedirs(override)
    write_file(os.path.join(override, 'nph-webjob.cfg'),
               b'CapContentLength = Y\nMaxContentLength = 100000\n')
    try:
        result = run_job(server, folder, server.url, 'streamed')
    finally:
        shutil.rmtree(os.path.dirname(override))
    err = result.stderr.decode()
    assert result.returncode == PUT_STAGE, err
    assert 'Status = [455]' in err and 'kept in TempDirectory' in err
    kept = sorted(n for n in os.listdir(folder) if '.out.' in n)
    assert kept and all(name in err for name in kept)
    held = sum(os.path.getsize(os.path.join(folder, n)) for n in kept)
    assert held + 100000 >= len(OUT) - SEGMENT
    report = server.verify()
    assert report.returncode == 1
    assert b'partial upload, not a group' in report.stdout
    shutil.rmtree(server.partial_folder())      # as its expiry would


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
@pytest.mark.parametrize('mode', ['resumable', 'streamed'])
def test_job_on_the_oldest_and_newest_python(server, tmp_path, mode, python):
    folder = str(tmp_path / 'job')
    argv = job_command(server, folder, server.url, mode)
    result = subprocess.run([python] + argv[1:], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=300)
    assert_stored_once(server, result, folder)


def test_streamed_run_time_limit_kills_the_group_and_uploads_its_output(
        server, tmp_path):
    """RunTimeLimit holds for a streamed job: the program's group is killed
    (exit 9, RunStage) and what it wrote before is stored whole."""
    write_file(os.path.join(server.root, 'profiles', 'client_1', 'commands',
                            'hang.sh'),
               b'#!/bin/sh\nseq 1 50000\nseq 1 3000 >&2\nexec sleep 300\n',
               0o755)
    folder = str(tmp_path / 'job')
    argv = job_command(server, folder, server.url, 'streamed',
                       RunTimeLimit=3)
    result = subprocess.run(argv[:-1] + ['hang.sh'], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=300)
    assert result.returncode == 9, result.stderr.decode()
    assert b'RunTimeLimit (3 s) expired' in result.stderr
    env = local_env(folder)
    assert b'KidSignal=9' in env
    job_id = [line[4:] for line in env.decode().splitlines()
              if line.startswith('Jid=')][0]
    found = [group for group in server.groups()
             if server.read(group, 'rdy') == ('Jid=%s\n' % job_id).encode()]
    assert len(found) == 1
    assert (server.read(found[0], 'out'), server.read(found[0], 'err')) == \
        (OUT, ERR)


@pytest.mark.parametrize('mode', ['resumable', 'streamed'])
def test_a_linktest_is_the_plain_put(server, tmp_path, mode):
    """RunType=linktest keeps nothing on the server: no HEAD, no PATCH, the
    original's PUT answered 251."""
    before = len(read_log_lines(server.root))
    result = run_job(server, str(tmp_path / 'job'), server.url, mode,
                     RunType='linktest')
    assert result.returncode == 0, result.stderr.decode()
    lines = read_log_lines(server.root, before + 2)[before:]
    assert [(line.split()[5], line.split()[11]) for line in lines] == \
        [('GET', '200'), ('PUT', '251')]


def test_streamed_output_larger_than_the_free_disk_arrives_whole(server,
                                                                 tmp_path):
    """TempDirectory on an 80 MiB tmpfs, a program writing 200 MiB: the
    staged modes could not hold it; streamed, at most 64 MiB of segments
    exist at once and the server stores all 200 MiB, hashes matching."""
    size = 200 << 20
    write_file(os.path.join(server.root, 'profiles', 'client_1', 'commands',
                            'image.sh'),
               b'#!/bin/sh\nexec head -c %d /dev/zero\n' % size, 0o755)
    disk = str(tmp_path / 'small-disk')
    os.makedirs(disk)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=80m', 'tmpfs', disk],
                   check=True)
    try:
        folder = os.path.join(disk, 'job')
        argv = job_command(server, folder, server.url, 'streamed',
                           UploadSegmentSize=8 << 20)
        result = subprocess.run(argv[:-1] + ['image.sh'],
                                stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=600)
        assert result.returncode == 0, result.stderr.decode()
        env = local_env(folder)
    finally:
        subprocess.run(['umount', disk], check=True)
    job_id = [line[4:] for line in env.decode().splitlines()
              if line.startswith('Jid=')][0]
    found = [group for group in server.groups()
             if server.read(group, 'rdy') == ('Jid=%s\n' % job_id).encode()]
    assert len(found) == 1
    stem = os.path.join(server.root, 'incoming', found[0])
    assert os.path.getsize(stem + '.out') == size
    assert not os.path.exists(stem + '.bad')      # the hashes matched
    assert b'StdOutHash=%s' % hashlib.md5(b'\0' * size).hexdigest().encode() \
        in env
