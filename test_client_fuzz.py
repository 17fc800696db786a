"""Every input gets one clear line and the right code (issue 12).

Fixed-seed fuzzing, in process for volume (50,000 configs, 20,000 server
responses, 2,000 command lines) and a sample as real processes under the
oldest and newest Python, which must end exactly as the in-process run
predicts.  An internal error (any exception outside the WebJobError tree),
a hang (a FIFO where a file is expected) or a code outside the README's
table fails the test.
"""

import io
import os
import random
import signal
import socket
import subprocess

import pytest

import webjob
from conftest import NEWEST_PY, OLDEST_PY
from test_client import WEBJOB, ScriptedServer

SEED = 20261201
SECRET = 'Fuzz-Secret-4242'


class Hang(BaseException):
    """Raised by SIGALRM when one input takes longer than any should."""


class Bounded(object):
    """Run one fuzz input under a timer; collect hangs and internal errors
    (anything but what the function returns, WebJobErrors included)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.hangs = []
        self.internal = []

    def run(self, function, data, *args):
        """(True, result), or (False, None) after recording the failure."""
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        try:
            return True, function(data, *args)
        except Hang:
            self.hangs.append(data)
        except Exception as error:
            self.internal.append((data, repr(error)))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return False, None

    def assert_none(self):
        assert self.internal[:5] == [] and self.hangs[:5] == []


@pytest.fixture
def bounded():
    """bounded(seconds): a Bounded whose timer raises Hang (a blocked open()
    returns EINTR for it)."""
    def on_alarm(number, frame):
        raise Hang()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    yield Bounded
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope='module')
def places(tmp_path_factory):
    """Files a fuzzed config may name: a FIFO, a folder, a device, a real
    file, a missing one, an importable config, a PEM bundle."""
    root = tmp_path_factory.mktemp('fuzz')
    fifo = str(root / 'fifo')
    os.mkfifo(fifo)
    (root / 'plain').write_bytes(b'not a certificate\n')
    (root / 'ok.cfg').write_bytes(b'RunType=linktest\n')
    (root / 'loop.cfg').write_bytes(b'Import=%s\n' % str(root / 'loop.cfg')
                                    .encode())
    (root / 'bad.cfg').write_bytes(b'HashType=\xff\n')
    (root / 'dir').mkdir()
    (root / 't\xe9mp').mkdir()
    return [fifo, str(root / 'plain'), str(root / 'ok.cfg'),
            str(root / 'loop.cfg'), str(root / 'bad.cfg'), str(root / 'dir'),
            str(root / 't\xe9mp'), '/dev/zero', '/dev/null',
            str(root / 'missing'), 'relative-missing']


# Configs ######################################################################

CONTROL_NAMES = [name for name, kind, default in webjob.CLIENT_CONTROLS]
VALUES = [b'', b'Y', b'n', b'x', b'0', b'1', b'9', b'15', b'64', b'65',
          b'999999', b'9' * 25, b'9' * 5000, b'-1', b'1e3', b'\xff\xfe',
          b'caf\xc3\xa9', b'a\x00b', b'\x00', b'\x0b\x0c\x1b', b'#', b'a=b',
          b'md5', b'SHA256', b'basic', b'NONE', b'snapshot', b'LinkTest',
          b'http://127.0.0.1:1/x', b'https://127.0.0.1:1/x',
          b'http://u:' + SECRET.encode() + b'@127.0.0.1:1/c?m=a@b',
          b'http://u:' + SECRET.encode() + b'/x@127.0.0.1:1/',
          b'http://[::1]:1/', b'http://h:99999/', b'ftp://h/', b'http://h',
          b'%user%pass', b'cp %vp %tp', b'a' * 300, b'client_1', b'.hidden']


def make_config(rng, places):
    lines = []
    for _ in range(rng.randint(0, 7)):
        roll = rng.random()
        if roll < 0.08:
            lines.append(bytes(rng.randrange(256) for _ in
                               range(rng.randint(1, 30))))
            continue
        if roll < 0.18:
            control = 'Import'
        elif roll < 0.22:
            control = rng.choice(['Bogus', 'URLPasword', '', ' ', 'http://u:'
                                  + SECRET + '@h/'])
        else:
            control = rng.choice(CONTROL_NAMES)
            if rng.random() < 0.2:
                control = control.swapcase()
        if rng.random() < 0.3:
            value = rng.choice(places).encode('utf-8', 'surrogateescape')
        else:
            value = rng.choice(VALUES)
        sep = rng.choice([b'=', b' = ', b'=', b'', b'==', b'\t=\t'])
        lines.append(control.encode() + sep + value)
    if rng.random() < 0.6:      # often start from a config that is valid
        lines[:0] = [b'ClientId=client_1', b'URLGetURL=http://127.0.0.1:1/x']
    if rng.random() < 0.4:      # and switch on what reads the host's files
        place = lambda: rng.choice(places).encode('utf-8', 'surrogateescape')
        lines += rng.choice([
            [b'URLGetURL=https://127.0.0.1:1/x', b'SSLVerifyPeerCert=Y',
             b'SSLExpectedPeerCN=x', b'SSLBundledCAsFile=' + place()],
            [b'URLPutURL=https://127.0.0.1:1/x', b'SSLUseCertificate=Y',
             b'SSLPublicCertFile=' + place(), b'SSLPrivateKeyFile=' + place()],
            [b'DsvVerifySignature=Y', b'DsvCertificateTree=' + place()],
            [b'TempDirectory=' + place()],
            [b'Import=' + place()]])
    ending = rng.choice([b'\n', b'\r\n', b'\r'])
    return ending.join(lines) + rng.choice([b'', ending])


def configure(data, temp):
    """What -e -f - does with a config before the network: read, check,
    configure.  Returns the WebJobError raised, or None."""
    try:
        values = webjob.read_config('-', webjob.CLIENT_CONTROLS,
                                    io.BytesIO(data))
        if not values['TempDirectory'] or not os.path.isabs(
                values['TempDirectory']):
            values['TempDirectory'] = temp
        webjob.configure_job(values, 'job.sh', [])
    except webjob.WebJobError as exc:
        return exc
    return None


CONFIG_CODES = (webjob.XER_READ_PROPERTIES, webjob.XER_CHECK_DEPENDENCIES,
                webjob.XER_CONFIGURE)


def assert_one_clear_line(exc, codes):
    text = str(exc)
    assert exc.exit_code in codes, (type(exc), text)
    line = webjob.stderr_line(text)     # what write_stderr() prints
    assert line and len(line) <= webjob.MAX_LINE + 3, repr(text)
    assert SECRET not in text, text


def test_config_fuzz_in_process(tmp_path, places, bounded, capsys):
    rng = random.Random(SEED)
    runs, codes = bounded(5), {}
    for number in range(50000):
        done, exc = runs.run(configure, make_config(rng, places), str(tmp_path))
        if not done:
            continue
        if exc is not None:
            assert_one_clear_line(exc, CONFIG_CODES)
            codes[exc.exit_code] = codes.get(exc.exit_code, 0) + 1
        else:
            codes[0] = codes.get(0, 0) + 1
        if number % 1000 == 0:
            capsys.readouterr()   # the SSLVerifyPeerCert=N warnings
    runs.assert_none()
    # The fuzz reaches every outcome, so that it can find what it looks for.
    assert all(codes.get(code, 0) > 100 for code in (0, 5, 7)), codes


# Server responses #############################################################

STATUS_LINES = [b'HTTP/1.1 200 OK', b'HTTP/1.0 204 No Content', b'HTTP/1.1 299 x',
                b'HTTP/1.1 404 Not Found', b'HTTP/1.1 401 Unauthorized',
                b'HTTP/1.1 500 Internal\x00Error', b'HTTP/1.1 20 OK',
                b'HTTP/x.1 200 OK', b'SSH-2.0-OpenSSH', b'', b'HTTP/1.1 200',
                b'HTTP/1.1 200 \xff\xfe', b'http/1.1 200 OK']
JOB_IDS = [b'server_1_1700000000_00001', b'j1\x0bHostname=FORGED', b'j\x00',
           b'', b'a' * 255, b'a' * 256, b'j 1', b'j1\xc3\xa9', b'j1\x1b[2J']


def make_field(rng, body):
    roll = rng.random()
    if roll < 0.45:
        value = rng.choice([b'%d' % len(body), b'%d' % len(body), b'0',
                            b'%d' % (len(body) + 1), b'%d' % max(0, len(body)
                                                                 - 1),
                            b'-1', b'1e3', b'9' * 19, b'9' * 20, b'9' * 5000,
                            b' 12', b'0x10', b'\xff', b''])
        return b'Content-Length: ' + value
    if roll < 0.65:
        return b'Job-Id: ' + rng.choice(JOB_IDS)
    if roll < 0.72:
        return b'Transfer-Encoding: ' + rng.choice([b'chunked', b'identity',
                                                    b'gzip, chunked'])
    if roll < 0.8:
        return b'WebJob-Payload-Signature: ' + rng.choice([b'', b'AAAA',
                                                           b'x' * 300])
    if roll < 0.9:
        return rng.choice([b'X-Pad: ' + b'a' * rng.randint(0, 17000),
                           b'no colon here', b': empty name', b'Server: nginx'])
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))


def make_response(rng):
    size = rng.choice([0, 1, 19, 300, 5000])
    body = rng.getrandbits(8 * size).to_bytes(size, 'little') if size else b''
    lines = [rng.choice(STATUS_LINES)]
    lines += [make_field(rng, body) for _ in range(rng.randint(0, 5))]
    ending = rng.choice([b'\r\n', b'\n', b'\r\n', b'\r'])
    data = ending.join(lines) + rng.choice([b'\r\n\r\n', b'\n\n', b'\n\r\n',
                                            b'\r\n', b''])
    data += body[:rng.choice([len(body), len(body), rng.randint(0, len(body))])]
    return data


def receive(data, limit):
    """The client's side of one answer on a real socket: head, then the
    body of a 2xx (to /dev/null).  Returns the Response or the error."""
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        deadline = webjob.Deadline(10, 'GetTimeLimit')
        response = webjob.read_response_head(ours, deadline)
        if response.ok:
            with open(os.devnull, 'wb') as sink:
                response.length = webjob.read_body_to_file(
                    response, sink.fileno(), limit, deadline)
        return response
    except webjob.TransportError as exc:
        return exc
    finally:
        ours.close()
        theirs.close()


def test_response_fuzz_in_process(bounded):
    rng = random.Random(SEED)
    runs, outcomes = bounded(20), {'ok': 0, 'refused': 0}
    for _ in range(20000):
        data = make_response(rng)
        done, result = runs.run(receive, data, rng.choice([0, 0, 100]))
        if not done:
            continue
        if isinstance(result, webjob.TransportError):
            outcomes['refused'] += 1
            assert webjob.stderr_line(result)
            continue
        outcomes['ok'] += 1
        job_id = result.fields.get('job-id')
        assert job_id is None or webjob.is_job_id(job_id), data
        if result.ok:
            assert result.length == result.fields['content-length']
    runs.assert_none()
    assert outcomes['ok'] > 500 and outcomes['refused'] > 500, outcomes


# Command lines ###############################################################

def test_command_line_fuzz_in_process(tmp_path, capsys, places, bounded):
    cfg = tmp_path / 'c.cfg'
    cfg.write_text('ClientId=c\nURLGetURL=http://127.0.0.1:1/x\n'
                   'TempDirectory=%s\n' % tmp_path)
    tokens = ['-e', '-f', '--file', '-g', '--get-url', '-h', '-t', '--type',
              '-v', '--execute', 'md5', 'SHA1', 'sha512', str(cfg),
              str(cfg) + ',' + str(cfg), 'job.sh', 'a/b', '..', '-x', '',
              '\udcff', 'http://u:%s@127.0.0.1:1/x' % SECRET, 'http://h',
              'x' * 300] + [p for p in places if 'fifo' not in p]
    rng = random.Random(SEED)
    runs, internal = bounded(20), []
    for _ in range(2000):
        argv = [rng.choice(tokens) for _ in range(rng.randint(0, 5))]
        done, code = runs.run(webjob.main, argv)
        err = capsys.readouterr().err
        if 'internal error' in err or 'Traceback' in err:
            internal.append((argv, err))
        assert not done or code in range(12), (argv, code)
        assert SECRET not in err
        for line in err.splitlines():
            assert line.startswith(('webjob: ', 'Usage:', '       ')), line
    assert internal[:5] == []
    runs.assert_none()


# A sample as real processes ###################################################

def expected_code(data, temp):
    """The exit code -e -f - must give for a config whose GET is refused."""
    exc = configure(data, temp)
    return webjob.XER_GET_STAGE if exc is None else exc.exit_code


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=['oldest', 'newest'])
def test_config_fuzz_sample_as_real_processes(tmp_path, places, python):
    rng = random.Random(SEED + 1)
    temp = str(tmp_path)
    sample = []
    while len(sample) < 24:
        data = make_config(rng, places)
        code = expected_code(data, temp)
        if code == webjob.XER_GET_STAGE:
            data += b'\nTempDirectory=%s\nURLGetURL=http://127.0.0.1:1/x\n' % \
                temp.encode()
        sample.append((data, code))
    for data, code in sample:
        result = subprocess.run([python, '-I', '-S', WEBJOB, '-e', '-f', '-',
                                 'job.sh'], input=data, timeout=120,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = result.stderr.decode('ascii')
        assert 'internal error' not in err and 'Traceback' not in err, err
        assert result.returncode == code, (data, err)
        assert SECRET.encode() not in result.stderr


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=['oldest', 'newest'])
def test_response_fuzz_sample_as_real_processes(tmp_path, python):
    rng = random.Random(SEED + 2)
    server = ScriptedServer()
    temp = tmp_path / 'temp'
    temp.mkdir()
    cfg = tmp_path / 'w.cfg'
    cfg.write_text('ClientId=c\nURLGetURL=%s\nTempDirectory=%s\n'
                   % (server.url(), temp))
    try:
        for _ in range(16):
            data = make_response(rng)
            result = receive(data, 0)
            ok = not isinstance(result, webjob.TransportError) and result.ok
            server.respond = lambda request, data=data: data
            for name in os.listdir(str(temp)):
                os.unlink(str(temp / name))
            run = subprocess.run([python, '-I', '-S', WEBJOB, '-e', '-f',
                                  str(cfg), 'job.sh'], timeout=120,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            err = run.stderr.decode('ascii')
            assert 'internal error' not in err and 'Traceback' not in err
            # A whole 2xx body is run (exit 0, or 9 when it is no program).
            assert run.returncode in ((0, 9) if ok else (8,)), (data, err)
    finally:
        server.close()
