#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""bench_webjob.py -- how fast webjob.py and nph_webjob.py are, beside C tools.

    python3 bench_webjob.py [--quick] [--json] [--size BYTES] [--python PATH]

Starts its own servers on 127.0.0.1 (nph_webjob.py serve, a bare Python
http.server, and Apache with mod_cgid when apache2 is installed), runs each
group of compared commands alternately (A B A B ...), and prints medians as
ratios against a reference: curl, sh and coreutils for the client, a bare
http.server and a trivial CGI for the server.  Goal misses are printed, not
failures: the exit status is 1 only when a figure could not be measured at
all (a missing apache2 or Python 3.6 skips its figures instead).

Python interpreters run with -I -S unless --site is given: this machine's
pyenv installs carry a site-packages .pth hook that imports certifi on every
start (28 ms on 3.11 here, -I or not), which is no part of either program
and would flatten every start-up ratio towards 1.

Standard library only; uses curl, sh, head, tee, md5sum and apache2 as
external programs.  Every temporary folder and process it starts is removed
or stopped at the end, also on Ctrl-C or SIGTERM.
"""

import argparse
import errno
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


###############################################################################
# Constants ###################################################################
###############################################################################

HERE = os.path.dirname(os.path.abspath(__file__))
WEBJOB = os.path.join(HERE, 'webjob.py')
SERVER = os.path.join(HERE, 'nph_webjob.py')
PY36 = '/root/.pyenv/versions/3.6.15/bin/python'

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_SIZE = GIB
QUICK_SIZE = 8 * MIB
LOOPBACK = '127.0.0.1'
CLIENT_ID = 'bench_1'
CGI_PATH = '/cgi-client/nph-webjob.cgi'
PLAIN_CGI_PATH = '/cgi-client/plain-file.cgi'
CONNECTIONS = 16
COMMAND_TIMEOUT = 900.0         # any one timed command
START_TIMEOUT = 30.0            # a server must listen within this
STOP_TIMEOUT = 10.0             # a server must exit within this
LOAD_GRACE = 30.0               # a load run may go on this long for 1 answer
APACHE_MODULES = '/usr/lib/apache2/modules'
CLEAN_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

TINY_OUTPUT = b'webjob bench tiny job\n'
TINY_SCRIPT = b'#!/bin/sh\necho webjob bench tiny job\n'        # 2 lines
OUT_SCRIPT = b'#!/bin/sh\nexec head -c "$1" /dev/zero\n'
PAYLOAD_HEAD = b'#!/bin/sh\n[ -z "$1" ] || head -c "$1" /dev/zero\nexit 0\n'
PAD_LINE = b'#' * 63 + b'\n'    # sh never reads past `exit 0`

CURL = ['curl', '-sSf', '--noproxy', '*']
SHELL_JOB = ('curl -sSf --noproxy "*" -o "$1" "$2" && sh "$1" > "$3" 2> "$4" '
             '&& curl -sSf --noproxy "*" -H "Expect:" -o /dev/null '
             '-T "$3" "$5"')
TEE_MD5 = 'head -c "$1" /dev/zero | tee "$2" | md5sum'
COMPILE_ONLY = "compile(open('webjob.py').read(), 'webjob.py', 'exec')"

#: Repetitions: pairs (or rounds) after one warm-up of each command.
PLANS = {
    'quick': {'startup': 8, 'tiny': 6, 'split': 3, 'get': 2, 'transfer': 2,
              'rss': 1, 'rounds': 1, 'seconds': 1.0, 'warmup': 0.3,
              'cgi_seconds': 1.5},
    'full': {'startup': 40, 'tiny': 30, 'split': 10, 'get': 5, 'transfer': 5,
             'rss': 3, 'rounds': 3, 'seconds': 5.0, 'warmup': 1.0,
             'cgi_seconds': 5.0},
}

#: (key, comparison, bound, goal as printed); rss_large_mb's goal is on the
#: difference large - small.
FIGURES = (
    ('startup_ratio', '<=', 1.2, '<= 1.2'),
    ('startup_ratio_py36', '<=', 1.2, '<= 1.2'),
    ('tiny_job_ratio', '<=', 4.0, '<= 4.0'),
    ('tiny_job_ratio_py36', '<=', 4.0, '<= 4.0'),
    ('get_ratio', '>=', 0.9, '>= 0.9'),
    ('put_ratio', '>=', 0.9, '>= 0.9'),
    ('capture_ratio', '>=', 0.8, '>= 0.8'),
    ('rss_small_mb', None, None, '-'),
    ('rss_large_mb', 'delta<', 10.0, 'large-small < 10'),
    ('serve_rps_ratio', '>=', 0.8, '>= 0.8'),
    ('cgi_rps_ratio', '>=', 0.8, '>= 0.8'),
)

SPLIT_ROWS = (
    ('start', 'interpreter start (spawn to first line)'),
    ('compile', 'read + compile webjob.py'),
    ('module', 'module body (definitions)'),
    ('config', 'read_config'),
    ('configure', 'configure_job'),
    ('get', 'GET stage (run_get_stage)'),
    ('run', 'RUN stage (run_run_stage)'),
    ('put', 'PUT stage (run_put_stage)'),
    ('outside', 'main() outside those: argv, unlink'),
    ('exit', 'interpreter exit'),
    ('total', 'whole process'),
)

# The job driver: runs webjob.py's own main() exactly as `python webjob.py`
# would, and timestamps compile, module body and the stage functions with
# the system-wide monotonic clock.  Python 3.6 compatible.
DRIVER = r'''
import sys, time
MARKS = {'start': time.monotonic()}


def wrap(namespace, name, spans):
    inner = namespace.get(name)
    if inner is None:
        return

    def timed(*args, **kwargs):
        begin = time.monotonic()
        try:
            return inner(*args, **kwargs)
        finally:
            spans[name] = (begin, time.monotonic())
    namespace[name] = timed


def main():
    out_path, source_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(source_path, 'rb') as handle:
        source = handle.read()
    code = compile(source, source_path, 'exec')
    MARKS['compiled'] = time.monotonic()
    namespace = {'__name__': 'webjob_bench', '__file__': source_path,
                 '__builtins__': __builtins__}
    exec(code, namespace)
    MARKS['defined'] = time.monotonic()
    spans = {}
    for name in ('read_config', 'configure_job', 'run_get_stage',
                 'run_run_stage', 'run_put_stage'):
        wrap(namespace, name, spans)
    sys.stderr.write('@@bench-main\n')
    sys.stderr.flush()
    sys.argv = [source_path] + argv
    MARKS['main'] = time.monotonic()
    code = namespace['main'](argv)
    MARKS['end'] = time.monotonic()
    with open(out_path, 'w') as handle:
        handle.write(repr({'marks': MARKS, 'spans': spans, 'rc': code}))
    return code


sys.exit(main())
'''

# The reference server: a bare http.server, HTTP/1.1, Nagle off, serving one
# file for any GET, logging each request to stderr as http.server does.
BASELINE_SERVER = r'''
import sys, socketserver, http.server
PORT, PATH = int(sys.argv[1]), sys.argv[2]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    disable_nagle_algorithm = True

    def do_GET(self):
        with open(PATH, 'rb') as handle:
            body = handle.read()
        self.send_response(200)
        self.send_header('Content-Type', 'application/octet-stream')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)


Server = getattr(http.server, 'ThreadingHTTPServer', None)
if Server is None:  # Python 3.6
    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

server = Server(('127.0.0.1', PORT), Handler)
sys.stderr.write('listening on 127.0.0.1:%d\n' % PORT)
sys.stderr.flush()
server.serve_forever()
'''

# The reference CGI: same interpreter line as nph-webjob.cgi, prints the file.
PLAIN_CGI = r'''
import sys
with open(%(path)r, 'rb') as handle:
    body = handle.read()
out = sys.stdout.buffer
out.write(b'Content-Type: application/octet-stream\r\nContent-Length: '
          + str(len(body)).encode('ascii') + b'\r\n\r\n' + body)
out.flush()
'''

APACHE_CONF = '''\
ServerRoot {root}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {root}/run/httpd.pid
DefaultRuntimeDir {root}/run
ErrorLog {root}/error.log
LogLevel warn
{user}
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule alias_module {modules}/mod_alias.so
LoadModule cgid_module {modules}/mod_cgid.so
LoadModule env_module {modules}/mod_env.so
ScriptSock {root}/run/cgisock
KeepAlive On
MaxKeepAliveRequests 0
StartServers 2
ServerLimit 16
ThreadsPerChild 25
MaxRequestWorkers 400
DocumentRoot {root}/htdocs
SetEnv WEBJOB_PROPERTIES_FILE {root}/nph-webjob.cfg
ScriptAlias /cgi-client/ {root}/cgi-client/
<Directory {root}/cgi-client>
  Require all granted
  Options +ExecCGI
</Directory>
'''


class BenchError(Exception):
    """A figure could not be measured; the message says why."""


###############################################################################
# Command line ################################################################
###############################################################################

def parse_args(argv):
    """The options of the issue, plus --site and --server for experiments."""
    parser = argparse.ArgumentParser(
        prog='bench_webjob.py',
        description='Benchmark webjob.py and nph_webjob.py on loopback.')
    parser.add_argument('--json', action='store_true',
                        help='print one JSON object instead of the table')
    parser.add_argument('--quick', action='store_true',
                        help='small sizes, few repetitions (CI smoke test)')
    parser.add_argument('--size', type=int, default=None, metavar='BYTES',
                        help='large transfer size (default 1 GiB; %d with '
                             '--quick)' % QUICK_SIZE)
    parser.add_argument('--python', default=sys.executable, metavar='PATH',
                        help='interpreter that runs webjob.py (default: %s)'
                             % sys.executable)
    parser.add_argument('--server-python', default=None, metavar='PATH',
                        help='interpreter that runs the servers (default: '
                             '--python)')
    parser.add_argument('--server', default=SERVER, metavar='PATH',
                        help='nph_webjob.py to benchmark (default: next to '
                             'this file)')
    parser.add_argument('--site', action='store_true',
                        help='run interpreters with -I only, not -I -S')
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = QUICK_SIZE if args.quick else DEFAULT_SIZE
    if args.size < 2 * MIB:
        parser.error('--size must be at least %d bytes' % (2 * MIB))
    args.server_python = args.server_python or args.python
    return args


###############################################################################
# Processes and timing ########################################################
###############################################################################

class Run(object):
    """One timed child: wall seconds, peak RSS, exit code, stderr text."""

    def __init__(self, started, ended, usage, returncode, stderr):
        self.started = started
        self.ended = ended
        self.wall = ended - started
        self.maxrss_mib = usage.ru_maxrss / 1024.0 if usage else None
        self.returncode = returncode
        self.stderr = stderr
        self.data = None


def log_progress(text):
    """Progress goes to stderr, so --json keeps stdout to one object."""
    sys.stderr.write('bench: %s\n' % text)
    sys.stderr.flush()


def build_environment():
    """The children's environment: no proxies, no PYTHON* variables, and
    a UTF-8 C locale (Python 3.6 would read webjob.py as ASCII under C)."""
    env = dict((key, value) for key, value in os.environ.items()
               if not key.lower().endswith('_proxy')
               and not key.startswith(('PYTHON', 'LC_')))
    env['LC_ALL'] = 'C.UTF-8'
    env['PYTHONDONTWRITEBYTECODE'] = '1'
    return env


def decode_status(status):
    """A wait status as Popen.returncode would give it."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def run_timed(bench, argv, cwd=None, env=None, timeout=COMMAND_TIMEOUT):
    """Run one child; wall time from the monotonic clock, RSS from wait4."""
    errors = tempfile.TemporaryFile(dir=bench.workspace)
    lock = threading.Lock()
    reaped = []

    def kill_on_timeout():
        with lock:
            if not reaped:
                kill_process(proc.pid, signal.SIGKILL)

    try:
        started = time.monotonic()
        proc = subprocess.Popen(argv, cwd=cwd, env=env or bench.env,
                                stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errors)
        bench.running.add(proc)
        timer = threading.Timer(timeout, kill_on_timeout)
        timer.daemon = True
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        ended = time.monotonic()
        with lock:
            reaped.append(True)
            proc.returncode = decode_status(status)
        timer.cancel()
        bench.running.discard(proc)
        errors.seek(0)
        text = errors.read().decode('utf-8', 'replace')
    finally:
        errors.close()
    if ended - started >= timeout:
        raise BenchError('%s: killed after %d s' % (argv[0], timeout))
    return Run(started, ended, usage, proc.returncode, text)


def kill_process(pid, signal_number):
    try:
        os.kill(pid, signal_number)
    except OSError:
        pass


def require_success(run, what):
    """Refuse a failed run: a figure from failed runs would mean nothing."""
    if run.returncode != 0:
        tail = ' | '.join(run.stderr.strip().splitlines()[-3:])
        raise BenchError('%s exited %d: %s' % (what, run.returncode,
                                               tail or 'no message'))


def alternate_runs(bench, commands, pairs, prepare=None):
    """Run commands in turn, A B A B ..., after one warm-up of each.

    commands: (label, argv, cwd, after) tuples; after(run) may check or
    annotate a run.  Returns {label: [Run, ...]} of the counted runs.
    """
    runs = dict((label, []) for label, argv, cwd, after in commands)
    for index in range(pairs + 1):
        for label, argv, cwd, after in commands:
            if prepare is not None:
                prepare(label)
            run = run_timed(bench, argv, cwd)
            require_success(run, label)
            if after is not None:
                after(run)
            if index:
                runs[label].append(run)
    return runs


def build_python_argv(bench, python):
    return [python] + bench.flags


def probe_version(bench, python):
    """(major, minor, micro) of an interpreter, or None when it cannot run."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return None
    try:
        code = 'import sys; print("%d %d %d" % sys.version_info[:3])'
        out = subprocess.check_output(
            build_python_argv(bench, python) + ['-c', code],
            env=bench.env, stdin=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return tuple(int(part) for part in out.split())


###############################################################################
# Statistics ##################################################################
###############################################################################

def compute_median(values):
    ordered = sorted(values)
    if not ordered:
        raise BenchError('no values to take a median of')
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2.0


def summarise_values(values, scale=1.0, digits=3):
    """median/min/max/n of a list, scaled (e.g. to ms) and rounded."""
    return {'median': round(compute_median(values) * scale, digits),
            'min': round(min(values) * scale, digits),
            'max': round(max(values) * scale, digits),
            'n': len(values)}


def compute_paired_ratio(numerators, denominators):
    """Median of the per-pair ratios: robust against drift over the run."""
    return compute_median([a / b for a, b in zip(numerators, denominators)])


def compute_mb_per_s(size, seconds):
    return size / seconds / 1e6


###############################################################################
# Workspace and payloads ######################################################
###############################################################################

def create_workspace(bench):
    """One temp folder for everything, traversable by www-data (Apache)."""
    bench.workspace = tempfile.mkdtemp(prefix='bench_webjob.')
    bench.cleanups.append(lambda: shutil.rmtree(bench.workspace, True))
    os.chmod(bench.workspace, 0o755)
    for name in ('client', 'work', 'cfg'):
        os.mkdir(os.path.join(bench.workspace, name))
    bench.client_dir = os.path.join(bench.workspace, 'client')
    bench.work_dir = os.path.join(bench.workspace, 'work')
    bench.driver = write_file(os.path.join(bench.workspace, 'driver.py'),
                              DRIVER.encode('utf-8'))
    bench.baseline = write_file(os.path.join(bench.workspace, 'baseline.py'),
                                BASELINE_SERVER.encode('utf-8'))


def write_file(path, data, mode=0o644):
    with open(path, 'wb') as handle:
        handle.write(data)
    os.chmod(path, mode)
    return path


def write_padded_script(path, head, size):
    """A script of exactly size bytes: head, then comment lines (never run)."""
    block = PAD_LINE * (MIB // len(PAD_LINE))
    left = size - len(head)
    with open(path, 'wb') as handle:
        handle.write(head)
        while left > 0:
            chunk = block[:left]
            handle.write(chunk)
            left -= len(chunk)
    os.chmod(path, 0o644)
    return path


def make_commands_dir(tree):
    path = os.path.join(tree, 'profiles', CLIENT_ID, 'commands')
    if not os.path.isdir(path):
        os.makedirs(path)
    return path


def write_small_payloads(bench):
    """tiny.sh (2 lines), out.sh (writes $1 bytes), small.sh (1 MiB)."""
    folder = make_commands_dir(bench.server_root)
    write_file(os.path.join(folder, 'tiny.sh'), TINY_SCRIPT)
    write_file(os.path.join(folder, 'out.sh'), OUT_SCRIPT)
    write_padded_script(os.path.join(folder, 'small.sh'), PAYLOAD_HEAD, MIB)
    bench.tiny_path = os.path.join(folder, 'tiny.sh')


def ensure_big_payload(bench):
    """big.sh: --size bytes, exits at once, or writes $1 bytes when given."""
    if bench.big_path is None:
        need = 4 * bench.size + 256 * MIB
        stat = os.statvfs(bench.workspace)
        free = stat.f_bavail * stat.f_frsize
        if free < need:
            raise BenchError('not enough disk space in %s: %d MiB free, %d '
                             'MiB needed for --size %d' % (
                                 bench.workspace, free // MIB, need // MIB,
                                 bench.size))
        log_progress('writing the %d-byte payload' % bench.size)
        path = os.path.join(make_commands_dir(bench.server_root), 'big.sh')
        bench.big_path = write_padded_script(path, PAYLOAD_HEAD, bench.size)
    return bench.big_path


def write_client_config(bench, name, put=True, unlink_executable=True):
    """A webjob.py config against the standalone server."""
    url = 'http://%s:%d%s' % (LOOPBACK, bench.server_port, CGI_PATH)
    lines = ['ClientId=%s' % CLIENT_ID,
             'URLGetURL=%s' % url,
             'TempDirectory=%s' % bench.client_dir,
             'OverwriteExecutable=Y',
             'UnlinkExecutable=%s' % ('Y' if unlink_executable else 'N'),
             'UnlinkOutput=Y',
             'GetTimeLimit=%d' % COMMAND_TIMEOUT,
             'RunTimeLimit=%d' % COMMAND_TIMEOUT,
             'PutTimeLimit=%d' % COMMAND_TIMEOUT]
    if put:
        lines.append('URLPutURL=%s' % url)
    path = os.path.join(bench.workspace, 'cfg', name)
    write_file(path, ('\n'.join(lines) + '\n').encode('ascii'))
    return path


def clear_folder(path):
    """Remove the files in a folder (incoming/, client/), not the folder."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, True)
        else:
            try:
                os.unlink(full)
            except OSError:
                pass


def settle_disk(bench):
    """Before a timed bulk run: drop last run's files, flush dirty pages."""
    clear_folder(os.path.join(bench.server_root, 'incoming'))
    clear_folder(bench.client_dir)
    clear_folder(bench.work_dir)
    os.sync()


###############################################################################
# Wire protocol helpers #######################################################
###############################################################################

def escape_value(text):
    """The client's query escaping: [A-Za-z0-9_./-] kept, space '+'."""
    safe = ('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
            '0123456789_./-')
    out = []
    for byte in bytearray(text.encode('utf-8')):
        char = chr(byte)
        out.append(char if char in safe else '+' if char == ' '
                   else '%%%02x' % byte)
    return ''.join(out)


def build_query(bench, filename, lengths=None):
    """The WebJob GET query, or the PUT query when lengths are given."""
    info = os.uname()
    pairs = [('VERSION', bench.version_string),
             ('SYSTEM', '%s %s %s' % (info.machine, info.sysname,
                                      info.release)),
             ('CLIENTID', CLIENT_ID), ('FILENAME', filename),
             ('RUNTYPE', 'snapshot')]
    if lengths is not None:
        pairs += [('STDOUT_LENGTH', lengths[0]), ('STDERR_LENGTH', lengths[1]),
                  ('STDENV_LENGTH', lengths[2])]
    return '&'.join('%s=%s' % (name, escape_value(str(value)))
                    for name, value in pairs)


def build_url(bench, port, filename, lengths=None, path=CGI_PATH):
    return 'http://%s:%d%s?%s' % (LOOPBACK, port, path,
                                  build_query(bench, filename, lengths))


def build_get_request(bench, port, path, filename, close=False):
    """A keep-alive HTTP/1.1 GET carrying the WebJob query."""
    lines = ['GET %s?%s HTTP/1.1' % (path, build_query(bench, filename)),
             'Host: %s:%d' % (LOOPBACK, port),
             'Content-Type: application/octet-stream',
             'Content-Length: 0']
    if close:
        lines.append('Connection: close')
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('ascii')


def fetch_once(port, request, timeout=30.0):
    """Send one request with Connection: close; (status, body)."""
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    try:
        sock.sendall(request)
        data = b''
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b'\r\n\r\n')
    parts = head.split(b' ', 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise BenchError('malformed response from port %d: %r'
                         % (port, head[:80]))
    if b'\r\ntransfer-encoding: chunked' in head.lower():
        body = decode_chunked(body)
    return int(parts[1]), body


def measure_chunked(data):
    """Length of the complete chunked body at the start of data; -1 when
    more is needed, -2 when it is malformed (Apache chunks CGI output)."""
    pos = 0
    while True:
        eol = data.find(b'\r\n', pos)
        if eol < 0:
            return -1
        try:
            size = int(data[pos:eol].split(b';')[0], 16)
        except ValueError:
            return -2
        if size == 0:
            if data[eol + 2:eol + 4] == b'\r\n':
                return eol + 4
            if len(data) < eol + 4:
                return -1
            end = data.find(b'\r\n\r\n', eol + 2)     # after trailers
            return -1 if end < 0 else end + 4
        pos = eol + 2 + size + 2
        if pos > len(data):
            return -1


def decode_chunked(data):
    """The payload of a complete chunked body (for the correctness check)."""
    out, pos = [], 0
    while True:
        eol = data.find(b'\r\n', pos)
        if eol < 0:
            return b''.join(out)
        try:
            size = int(data[pos:eol].split(b';')[0], 16)
        except ValueError:
            return b''.join(out)
        if size == 0:
            return b''.join(out)
        out.append(data[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2


def check_serves(bench, port, path, what):
    """A server must answer a WebJob GET with tiny.sh, byte for byte."""
    status, body = fetch_once(port, build_get_request(
        bench, port, path, 'tiny.sh', close=True))
    if status != 200 or body != TINY_SCRIPT:
        raise BenchError('%s answered %d with %d bytes, not tiny.sh'
                         % (what, status, len(body)))


###############################################################################
# Servers #####################################################################
###############################################################################

def find_free_port():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def wait_for_port(port, alive, timeout=START_TIMEOUT):
    """Connect until the port answers; alive() says whether to keep trying."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), timeout=1.0).close()
            return
        except OSError:
            if not alive():
                raise BenchError('the server exited before listening')
            time.sleep(0.02)
    raise BenchError('nothing listens on port %d after %d s' % (port, timeout))


def read_tail(path, lines=5):
    try:
        with open(path, 'rb') as handle:
            text = handle.read().decode('utf-8', 'replace')
    except OSError:
        return ''
    return ' | '.join(text.strip().splitlines()[-lines:])


def start_server(bench, argv, name):
    """Start a long-running server in its own session; stopped at the end."""
    log_path = os.path.join(bench.workspace, name + '.log')
    with open(log_path, 'wb') as log_file:
        proc = subprocess.Popen(argv, env=bench.env, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=log_file,
                                start_new_session=True)
    bench.cleanups.append(lambda: stop_server(proc))
    return proc, log_path


def stop_server(proc):
    """SIGTERM its process group, then SIGKILL after STOP_TIMEOUT."""
    if proc.poll() is not None:
        return
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, signal_number)
        except OSError:
            pass
        try:
            proc.wait(timeout=STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            continue


def start_standalone_server(bench):
    """nph_webjob.py serve on a free loopback port, with its own tree."""
    if not os.path.isfile(bench.args.server):
        raise BenchError('%s does not exist' % bench.args.server)
    bench.server_root = os.path.join(bench.workspace, 'server')
    for attempt in range(3):
        port = find_free_port()
        argv = build_python_argv(bench, bench.args.server_python) + [
            bench.args.server, 'serve', '--root', bench.server_root,
            '--init', '--port', str(port), '--bind', LOOPBACK]
        proc, log_path = start_server(bench, argv, 'nph_webjob-serve')
        try:
            wait_for_port(port, lambda: proc.poll() is None)
        except BenchError as exc:
            stop_server(proc)
            if attempt == 2:
                raise BenchError('nph_webjob.py serve: %s: %s'
                                 % (exc, read_tail(log_path)))
            continue
        bench.server_port = port
        bench.server_log = log_path
        return


def start_baseline_server(bench):
    """The bare http.server reference, serving the same tiny.sh."""
    for attempt in range(3):
        port = find_free_port()
        argv = build_python_argv(bench, bench.args.server_python) + [
            bench.baseline, str(port), bench.tiny_path]
        proc, log_path = start_server(bench, argv, 'baseline-server')
        try:
            wait_for_port(port, lambda: proc.poll() is None)
        except BenchError as exc:
            stop_server(proc)
            if attempt == 2:
                raise BenchError('http.server reference: %s: %s'
                                 % (exc, read_tail(log_path)))
            continue
        return port


###############################################################################
# Apache ######################################################################
###############################################################################

def find_apache():
    """The apache2 binary, or None (then the CGI figure is skipped)."""
    found = shutil.which('apache2')
    if found is None and os.access('/usr/sbin/apache2', os.X_OK):
        found = '/usr/sbin/apache2'
    if found is None:
        return None
    for module in ('mod_mpm_event', 'mod_cgid', 'mod_alias', 'mod_env',
                   'mod_authz_core'):
        if not os.path.isfile(os.path.join(APACHE_MODULES, module + '.so')):
            return None
    return found


def read_shebang(path):
    with open(path, 'rb') as handle:
        first = handle.readline(512)
    if first.startswith(b'#!'):
        return first.rstrip(b'\r\n')
    return b'#!/usr/bin/env python3'


def choose_cgi_shebang(bench, shebang):
    """The interpreter line both CGIs get.

    The server's own line (#!/usr/bin/env python3) resolved on Apache's
    PATH, plus -IS like every other interpreter here, so that this machine's
    site-packages .pth hook is not paid by each CGI request; --site keeps
    the server's line as it is.
    """
    if bench.args.site:
        return shebang
    words = shebang[2:].decode('utf-8', 'replace').split()
    if not words:
        return shebang
    program = words[0]
    if os.path.basename(program) == 'env' and len(words) > 1:
        program = shutil.which(words[1], path=CLEAN_PATH)
    if not program or not os.access(program, os.X_OK):
        return shebang
    return ('#!%s -IS' % program).encode('utf-8')


def give_to_web_user(path):
    """chown -R www-data, when running as root (the CGI writes there)."""
    if os.geteuid() != 0:
        return
    import pwd
    try:
        user = pwd.getpwnam('www-data')
    except KeyError:
        return
    for folder, dirs, files in os.walk(path):
        os.chown(folder, user.pw_uid, user.pw_gid)
        for name in files:
            os.chown(os.path.join(folder, name), user.pw_uid, user.pw_gid)


def install_cgi_files(bench, root):
    """lib/ holds root-owned copies of nph_webjob.py and webjob.py, as an
    admin would install them; cgi-client/nph-webjob.cgi is the stub that
    'nph_webjob.py install-cgi' writes (the README's way), which also
    compiles both modules for the interpreter of the trivial CGI's line."""
    lib = os.path.join(root, 'lib')
    os.mkdir(lib)
    os.chmod(lib, 0o755)
    here = os.path.dirname(os.path.abspath(bench.args.server))
    for name in ('nph_webjob.py', 'webjob.py'):
        shutil.copyfile(os.path.join(here, name), os.path.join(lib, name))
        os.chmod(os.path.join(lib, name), 0o644)
    chosen = choose_cgi_shebang(bench, read_shebang(bench.args.server))
    python = chosen[2:].decode('utf-8', 'replace').split()[0]
    if os.path.basename(python) == 'env':
        python = shutil.which('python3', path=CLEAN_PATH) or sys.executable
    stub = os.path.join(root, 'cgi-client', 'nph-webjob.cgi')
    result = subprocess.run([python, os.path.join(lib, 'nph_webjob.py'),
                             'install-cgi', stub], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if result.returncode != 0:
        raise BenchError('install-cgi failed: %s' % result.stderr.decode(
            'utf-8', 'replace').strip())
    with open(stub, 'rb') as handle:
        stub_line = handle.readline().rstrip(b'\n')
    bench.details.setdefault('cgi', {}).update({
        'interpreter': stub_line[2:].decode('utf-8', 'replace'),
        'script': 'cgi-client/nph-webjob.cgi: the stub written by '
                  '"nph_webjob.py install-cgi" over lib/ (copies of '
                  'nph_webjob.py and webjob.py, byte code compiled by it)'})
    return stub_line


def prepare_apache(bench):
    """ServerRoot, the two CGIs, nph-webjob.cfg and its BaseDirectory."""
    root = os.path.join(bench.workspace, 'apache')
    for name in ('', 'run', 'htdocs', 'cgi-client'):
        os.mkdir(os.path.join(root, name))
        os.chmod(os.path.join(root, name), 0o755)
    tree = os.path.join(root, 'tree')
    for name in ('incoming', 'logfiles'):
        os.makedirs(os.path.join(tree, name))
    tiny = write_file(os.path.join(make_commands_dir(tree), 'tiny.sh'),
                      TINY_SCRIPT)
    give_to_web_user(tree)
    os.chmod(tree, 0o755)
    shebang = install_cgi_files(bench, root)
    write_file(os.path.join(root, 'cgi-client', 'plain-file.cgi'),
               shebang + b'\n' + (PLAIN_CGI % {'path': tiny}).encode('utf-8'),
               0o755)
    write_file(os.path.join(root, 'nph-webjob.cfg'), (
        'BaseDirectory=%s\nRequireUser=N\nRequireMatch=N\nEnableLogging=Y\n'
        % tree).encode('ascii'))
    return root


def start_apache(bench, binary):
    """Apache event + mod_cgid on a free port; stopped at the end.

    `-k start -D FOREGROUND` keeps the Apache parent our own child, so it is
    always known by its pid (and its workers by its process group), even
    when the pid file is not written yet.
    """
    root = prepare_apache(bench)
    port = find_free_port()
    user = 'User www-data\nGroup www-data' if os.geteuid() == 0 else ''
    conf = os.path.join(root, 'httpd.conf')
    text = APACHE_CONF.format(root=root, port=port, user=user,
                              modules=APACHE_MODULES)
    write_file(conf, text.encode('ascii'))
    env = {'PATH': CLEAN_PATH, 'LANG': 'C', 'LC_ALL': 'C'}
    command = [binary, '-f', conf, '-k']
    log_path = os.path.join(root, 'console.log')
    with open(log_path, 'wb') as console:
        proc = subprocess.Popen(command + ['start', '-D', 'FOREGROUND'],
                                env=env, stdin=subprocess.DEVNULL,
                                stdout=console, stderr=console,
                                start_new_session=True)
    bench.cleanups.append(lambda: stop_apache(proc, command, env))
    pid_file = os.path.join(root, 'run', 'httpd.pid')
    try:
        wait_for_port(port, lambda: proc.poll() is None)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(pid_file) and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        if proc.poll() is not None or not os.path.exists(pid_file):
            raise BenchError('apache2 is not running')
    except BenchError as exc:
        raise BenchError('apache2 -k start: %s: %s %s' % (
            exc, read_tail(log_path), read_tail(os.path.join(root,
                                                             'error.log'))))
    return port, root


def stop_apache(proc, command, env):
    """apache2 -k stop; then SIGTERM/SIGKILL its process group by pid."""
    if proc.poll() is not None:
        return
    try:
        subprocess.call(command + ['stop'], env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, timeout=STOP_TIMEOUT)
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_server(proc)


###############################################################################
# Load generator ##############################################################
###############################################################################

class LoadConnection(object):
    """One client connection: the response being read and its timing."""

    def __init__(self, sock):
        self.sock = sock
        self.connecting = False
        self.buffer = b''
        self.sent_at = None
        self.pending = b''
        self.reset()

    def reset(self):
        self.head_done = False
        self.need = None
        self.chunked = False
        self.status = None
        self.close_after = False


class LoadGenerator(object):
    """HTTP/1.1 GETs from N connections, one request in flight on each, for
    a bounded time.  Keep-alive when the server allows it; otherwise (an
    nph CGI answers Connection: close) it reconnects, without blocking the
    other connections, and the latency includes the connect."""

    def __init__(self, port, request, connections=CONNECTIONS):
        self.port = port
        self.request = request
        self.connections = connections
        self.selector = None
        self.live = {}
        self.ok = self.bad = self.errors = self.connects = 0
        self.latencies = []
        self.count_from = self.stop_at = 0.0

    def run(self, warmup, duration, grace=LOAD_GRACE):
        """Load for warmup + duration s; count what completes after the
        warm-up.  On a machine so slow that nothing completed, go on for up
        to grace more seconds, until one response has."""
        self.selector = selectors.DefaultSelector()
        try:
            for _ in range(self.connections):
                self.prime_connection()
            self.count_from = time.monotonic() + warmup
            self.stop_at = self.count_from + duration + grace
            planned_end = self.count_from + duration
            while True:
                now = time.monotonic()
                if now >= self.stop_at or (now >= planned_end and self.ok):
                    break
                missing = self.connections - len(self.live)
                for _ in range(missing):
                    self.open_connection()
                timeout = min(0.05 if missing else 0.5, self.stop_at - now)
                for key, mask in self.selector.select(timeout):
                    conn = key.data
                    if conn.connecting:
                        self.finish_connect(conn)
                    elif mask & selectors.EVENT_WRITE:
                        self.flush_request(conn)
                    else:
                        self.receive_response(conn)
        finally:
            self.stop_at = time.monotonic()     # stop counting
            for conn in list(self.live.values()):
                self.drop_connection(conn, False)
            self.selector.close()
        return self.summarise(max(self.stop_at - self.count_from, 1e-9))

    def summarise(self, duration):
        ordered = sorted(self.latencies)

        def pick(fraction):
            if not ordered:
                return None
            return round(ordered[min(len(ordered) - 1,
                                     int(len(ordered) * fraction))] * 1e3, 2)
        return {'rps': self.ok / duration, 'seconds': round(duration, 3),
                'ok': self.ok, 'bad': self.bad,
                'errors': self.errors, 'connects': self.connects,
                'p50_ms': pick(0.5), 'p99_ms': pick(0.99),
                'max_ms': pick(1.0)}

    def counting(self, now):
        return self.count_from <= now <= self.stop_at

    def prime_connection(self):
        """Before the clock starts: connect and do one blocking exchange, so
        that a server with a short listen backlog (socketserver's 5) has
        accepted this connection before the next one is opened."""
        try:
            sock = socket.create_connection((LOOPBACK, self.port), timeout=5.0)
        except OSError:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keep = self.exchange_blocking(sock)
        except OSError:
            keep = False
        if not keep:
            sock.close()        # the server closes: reconnect in the loop
            return
        sock.setblocking(False)
        conn = LoadConnection(sock)
        self.live[sock] = conn
        self.connects += 1
        self.selector.register(sock, selectors.EVENT_READ, conn)
        self.send_request(conn)

    def open_connection(self):
        """A non-blocking connect; the request goes out once it is up."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        code = sock.connect_ex((LOOPBACK, self.port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            if self.counting(time.monotonic()):
                self.errors += 1
            return
        conn = LoadConnection(sock)
        conn.connecting = True
        conn.sent_at = time.monotonic()
        self.live[sock] = conn
        self.selector.register(sock, selectors.EVENT_WRITE, conn)

    def finish_connect(self, conn):
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.drop_connection(conn, True)
            return
        conn.connecting = False
        self.connects += 1
        self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
        self.send_request(conn, conn.sent_at)

    def exchange_blocking(self, sock):
        """One request and its whole response; False when the server
        closes the connection after it (the caller reconnects later)."""
        sock.sendall(self.request)
        data = b''
        while b'\r\n\r\n' not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b'\r\n\r\n')
        probe = LoadConnection(sock)
        probe.buffer = head + b'\r\n\r\n'
        if not self.parse_head(probe):
            return False
        while True:
            if probe.chunked:
                length = measure_chunked(body)
                if length == -2:
                    return False
                if length >= 0:
                    break
            elif probe.need is None:
                return False
            elif len(body) >= probe.need:
                break
            chunk = sock.recv(65536)
            if not chunk:
                return False
            body += chunk
        return not probe.close_after

    def send_request(self, conn, started=None):
        conn.reset()
        conn.buffer = b''
        conn.sent_at = started or time.monotonic()
        conn.pending = self.request
        self.flush_request(conn, first=True)

    def flush_request(self, conn, first=False):
        try:
            sent = conn.sock.send(conn.pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.drop_connection(conn, True)
            return
        conn.pending = conn.pending[sent:]
        wanted = selectors.EVENT_READ | (
            selectors.EVENT_WRITE if conn.pending else 0)
        if conn.pending or not first:
            self.selector.modify(conn.sock, wanted, conn)

    def receive_response(self, conn):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop_connection(conn, True)
            return
        if not data:
            if conn.head_done and conn.need is None and not conn.chunked:
                self.complete_response(conn)    # body ended by close
                self.drop_connection(conn, False)
            else:
                self.drop_connection(conn, True)
            return
        conn.buffer += data
        if not conn.head_done and not self.parse_head(conn):
            return
        if conn.chunked:
            length = measure_chunked(conn.buffer)
            if length == -2:
                self.drop_connection(conn, True)
                return
            done = length >= 0
        else:
            done = conn.need is not None and len(conn.buffer) >= conn.need
        if done:
            self.complete_response(conn)
            if conn.close_after:
                self.drop_connection(conn, False)
            else:
                self.send_request(conn)

    def parse_head(self, conn):
        end = conn.buffer.find(b'\r\n\r\n')
        if end < 0:
            if len(conn.buffer) > 65536:
                self.drop_connection(conn, True)
            return False
        lines = conn.buffer[:end].split(b'\r\n')
        conn.buffer = conn.buffer[end + 4:]
        parts = lines[0].split(b' ', 2)
        if len(parts) < 2 or not parts[1].isdigit():
            self.drop_connection(conn, True)
            return False
        conn.status = int(parts[1])
        connection = b''
        for line in lines[1:]:
            name, _, value = line.partition(b':')
            name = name.strip().lower()
            if name == b'content-length' and value.strip().isdigit():
                conn.need = int(value.strip())
            elif name == b'transfer-encoding':
                conn.chunked = value.strip().lower() == b'chunked'
            elif name == b'connection':
                connection = value.strip().lower()
        if conn.need is None and (conn.status in (204, 304)
                                  or 100 <= conn.status < 200):
            conn.need = 0
        conn.close_after = connection == b'close' or (
            parts[0] == b'HTTP/1.0' and connection != b'keep-alive')
        conn.head_done = True
        return True

    def complete_response(self, conn):
        now = time.monotonic()
        if self.counting(now):
            if conn.status == 200:
                self.ok += 1
                self.latencies.append(now - conn.sent_at)
            else:
                self.bad += 1

    def drop_connection(self, conn, failed):
        if failed and self.counting(time.monotonic()):
            self.errors += 1
        self.live.pop(conn.sock, None)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()


def compare_rates(bench, targets, seconds):
    """Alternate load runs over (label, port, request); medians of req/s."""
    results = dict((label, []) for label, port, request in targets)
    for _ in range(bench.plan['rounds']):
        for label, port, request in targets:
            outcome = LoadGenerator(port, request).run(bench.plan['warmup'],
                                                       seconds)
            if outcome['ok'] == 0:
                raise BenchError('%s: no successful response under load '
                                 '(%d bad, %d errors)' % (
                                     label, outcome['bad'], outcome['errors']))
            results[label].append(outcome)
    return results


def describe_rates(outcomes):
    """Median req/s, latencies, error counts of a list of load runs."""
    def pick(key, how):
        values = [o[key] for o in outcomes if o[key] is not None]
        return how(values) if values else None
    return {'rps': round(compute_median([o['rps'] for o in outcomes]), 1),
            'p50_ms': pick('p50_ms', compute_median),
            'p99_ms': pick('p99_ms', compute_median),
            'max_ms': pick('max_ms', max),
            'bad': sum(o['bad'] for o in outcomes),
            'errors': sum(o['errors'] for o in outcomes),
            'connects': sum(o['connects'] for o in outcomes),
            'runs': len(outcomes)}


###############################################################################
# Measurements: client ########################################################
###############################################################################

def read_driver_output(path):
    """The driver's marks and stage spans (a repr'd dict)."""
    import ast
    try:
        with open(path) as handle:
            data = ast.literal_eval(handle.read())
    except (OSError, ValueError, SyntaxError) as exc:
        raise BenchError('the job driver wrote no result: %s' % exc)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    if data.get('rc') != 0:
        raise BenchError('webjob.py main() returned %r under the driver'
                         % data.get('rc'))
    return data


def build_driver_command(bench, python, arguments, importtime=False):
    """argv running webjob.py's main() under the timestamping driver."""
    out = os.path.join(bench.workspace, 'driver.out')
    flags = ['-X', 'importtime'] if importtime else []
    argv = build_python_argv(bench, python) + flags
    return argv + [bench.driver, out, WEBJOB] + arguments, out


def attach_driver_data(out_path):
    def after(run):
        run.data = read_driver_output(out_path)
    return after


def measure_span(run, name):
    """Seconds the driver saw one webjob.py function take."""
    spans = run.data['spans']
    if name not in spans:
        raise BenchError('the driver saw no %s()' % name)
    begin, end = spans[name]
    return end - begin


def compare_samples(numerators, denominators):
    """(ratio of medians, median a, median b, details) of two samples."""
    top, bottom = compute_median(numerators), compute_median(denominators)
    paired = compute_paired_ratio(numerators, denominators)
    return top / bottom, top, bottom, {'paired_ratio': round(paired, 3)}


def measure_startup(bench, python, key):
    """webjob.py -v against compiling webjob.py, same interpreter, flags."""
    argv = build_python_argv(bench, python)
    runs = alternate_runs(bench, [
        ('webjob.py -v', argv + ['webjob.py', '-v'], HERE, None),
        ('compile only', argv + ['-c', COMPILE_ONLY], HERE, None)],
        bench.plan['startup'])
    version = [r.wall for r in runs['webjob.py -v']]
    compiled = [r.wall for r in runs['compile only']]
    ratio, top, bottom, details = compare_samples(version, compiled)
    details.update({'webjob_v_ms': summarise_values(version, 1e3),
                    'compile_only_ms': summarise_values(compiled, 1e3)})
    bench.set_figure(key, ratio, 'webjob.py -v %.1f ms / compile only %.1f ms '
                     '(%d pairs)' % (top * 1e3, bottom * 1e3, len(version)),
                     details)


def measure_tiny_job(bench, python, key):
    """One whole webjob.py -e job against curl -o, sh, curl -T."""
    work, port = bench.work_dir, bench.server_port
    shell = ['sh', '-c', SHELL_JOB, 'sh', os.path.join(work, 'tiny.sh'),
             build_url(bench, port, 'tiny.sh'),
             os.path.join(work, 'tiny.out'), os.path.join(work, 'tiny.err'),
             build_url(bench, port, 'tiny.sh', (len(TINY_OUTPUT), 0, 0))]
    job_argv = build_python_argv(bench, python) + [
        WEBJOB, '-e', '-f', bench.configs['tiny'], 'tiny.sh']
    runs = alternate_runs(bench, [('webjob.py -e', job_argv, None, None),
                                  ('curl+sh+curl', shell, None, None)],
                          bench.plan['tiny'])
    clear_folder(os.path.join(bench.server_root, 'incoming'))
    job = [r.wall for r in runs['webjob.py -e']]
    base = [r.wall for r in runs['curl+sh+curl']]
    ratio, top, bottom, details = compare_samples(job, base)
    rss = compute_median([r.maxrss_mib for r in runs['webjob.py -e']])
    details.update({'webjob_ms': summarise_values(job, 1e3),
                    'shell_ms': summarise_values(base, 1e3),
                    'webjob_peak_rss_mib': round(rss, 1)})
    bench.set_figure(key, ratio, 'webjob.py -e %.1f ms / curl -o, sh, curl -T '
                     '%.1f ms (%d pairs)' % (top * 1e3, bottom * 1e3,
                                             len(job)), details)


def parse_importtime(stderr):
    """Top-level imports after the driver's marker: (total s, [(mod, s)])."""
    seen = False
    top = []
    for line in stderr.splitlines():
        if line.startswith('@@bench-main'):
            seen = True
            continue
        if not (seen and line.startswith('import time:')):
            continue
        fields = line.split('|')
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue
        name = fields[2][1:]
        if name.startswith(' '):
            continue                    # nested: counted in its parent
        top.append((name.strip(), int(fields[1]) / 1e6))
    return sum(seconds for name, seconds in top), top


def split_run(run):
    """One driver run cut into the SPLIT_ROWS parts, in seconds."""
    marks = run.data['marks']
    parts = {'start': marks['start'] - run.started,
             'compile': marks['compiled'] - marks['start'],
             'module': marks['main'] - marks['compiled'],
             'config': measure_span(run, 'read_config'),
             'configure': measure_span(run, 'configure_job'),
             'get': measure_span(run, 'run_get_stage'),
             'run': measure_span(run, 'run_run_stage'),
             'put': measure_span(run, 'run_put_stage'),
             'exit': run.ended - marks['end'],
             'total': run.wall}
    inside = sum(parts[name] for name in ('config', 'configure', 'get', 'run',
                                          'put'))
    parts['outside'] = marks['end'] - marks['main'] - inside
    return parts


def split_tiny_job(bench, python, version):
    """Where a tiny job's time goes: stage spans, plus -X importtime."""
    importtime = version >= (3, 7)
    argv, out = build_driver_command(bench, python, [
        '-e', '-f', bench.configs['tiny'], 'tiny.sh'], importtime)
    rows = dict((name, []) for name, label in SPLIT_ROWS)
    imports, modules = [], {}
    for index in range(bench.plan['split'] + 1):
        run = run_timed(bench, argv)
        require_success(run, 'webjob.py -e under the driver')
        run.data = read_driver_output(out)
        if not index:
            continue                    # warm-up
        for name, value in split_run(run).items():
            rows[name].append(value)
        if importtime:
            total, top = parse_importtime(run.stderr)
            imports.append(total)
            for name, seconds in top:
                modules.setdefault(name, []).append(seconds)
    clear_folder(os.path.join(bench.server_root, 'incoming'))
    split = dict((name, round(compute_median(values) * 1e3, 2))
                 for name, values in rows.items())
    split['runs'] = bench.plan['split']
    split['imports'] = None
    split['top_imports'] = ('Python %d.%d has no -X importtime'
                            % version[:2])
    if importtime:
        split['imports'] = round(compute_median(imports) * 1e3, 2)
        ranked = sorted(((compute_median(values), name)
                         for name, values in modules.items()), reverse=True)
        split['top_imports'] = [[name, round(seconds * 1e3, 2)]
                                for seconds, name in ranked[:8]]
    return split


def measure_get(bench):
    """GET of a --size program that exits at once, into TempDirectory,
    against curl -o of the same URL into the same folder."""
    big = ensure_big_payload(bench)
    size = os.path.getsize(big)
    job_argv = build_python_argv(bench, bench.python) + [
        WEBJOB, '-e', '-f', bench.configs['get'], 'big.sh']
    curl_argv = CURL + ['-o', os.path.join(bench.client_dir, 'big.curl'),
                        build_url(bench, bench.server_port, 'big.sh')]
    argv, out = build_driver_command(bench, bench.python, [
        '-e', '-f', bench.configs['get'], 'big.sh'])
    runs = alternate_runs(bench, [
        ('webjob.py -e', job_argv, None, None),
        ('curl -o', curl_argv, None, None),
        ('GET stage', argv, None, attach_driver_data(out))],
        bench.plan['get'], lambda label: settle_disk(bench))
    settle_disk(bench)
    stage = [measure_span(r, 'run_get_stage') for r in runs['GET stage']]
    job = [r.wall for r in runs['webjob.py -e']]
    curl = [r.wall for r in runs['curl -o']]
    ratio, top, bottom, details = compare_samples(curl, job)
    alone = compute_median(stage)
    details.update({
        'method': 'whole webjob.py -e process (start-up, GET, a RUN that '
                  'exits at once; no PUT) vs whole curl -o process, both '
                  'writing into TempDirectory',
        'bytes': size, 'webjob_s': summarise_values(job),
        'curl_s': summarise_values(curl),
        'webjob_get_stage_s': summarise_values(stage),
        'webjob_mb_s': round(compute_mb_per_s(size, bottom), 1),
        'curl_mb_s': round(compute_mb_per_s(size, top), 1),
        'get_stage_mb_s': round(compute_mb_per_s(size, alone), 1)})
    bench.set_figure('get_ratio', ratio, 'whole processes: curl -o %.3f s / '
                     'webjob.py -e %.3f s (%.0f vs %.0f MB/s, %d pairs); '
                     'GET stage alone %.0f MB/s' % (
                         top, bottom, compute_mb_per_s(size, top),
                         compute_mb_per_s(size, bottom), len(job),
                         compute_mb_per_s(size, alone)), details)


def measure_capture_and_put(bench):
    """RUN (capture + MD5) and PUT stages of a --size job, by timestamps,
    against head | tee | md5sum and curl -T of a --size file."""
    big = ensure_big_payload(bench)
    size = bench.size
    argv, out = build_driver_command(bench, bench.python, [
        '-e', '-f', bench.configs['put'], 'out.sh', str(size)])
    tee_argv = ['sh', '-c', TEE_MD5, 'sh', str(size),
                os.path.join(bench.work_dir, 'cap.out')]
    curl_argv = CURL + ['-H', 'Expect:', '-o', '/dev/null', '-T', big,
                        build_url(bench, bench.server_port, 'big.sh',
                                  (size, 0, 0))]
    runs = alternate_runs(bench, [
        ('webjob.py -e', argv, None, attach_driver_data(out)),
        ('head|tee|md5sum', tee_argv, None, None),
        ('curl -T', curl_argv, None, None)],
        bench.plan['transfer'], lambda label: settle_disk(bench))
    settle_disk(bench)
    jobs = runs['webjob.py -e']
    capture = [measure_span(r, 'run_run_stage') for r in jobs]
    put = [measure_span(r, 'run_put_stage') for r in jobs]
    tee = [r.wall for r in runs['head|tee|md5sum']]
    curl = [r.wall for r in runs['curl -T']]
    set_stage_figure(bench, 'capture_ratio', size, tee, capture, (
        'head|tee|md5sum', 'RUN stage', 'tee_md5sum_s', 'run_stage_s'),
        'webjob RUN stage (spawn, capture to .out, MD5 by the follower '
        'thread, finish) by timestamps vs the whole sh -c pipeline')
    set_stage_figure(bench, 'put_ratio', size, curl, put, (
        'curl -T', 'PUT stage', 'curl_s', 'put_stage_s'),
        'webjob PUT stage (write+fsync .env, connect, send .out/.err/.env, '
        'response) by timestamps vs the whole curl -T process (its start-up '
        'included)')


def set_stage_figure(bench, key, size, reference, stage, names, method):
    """A throughput figure: the reference's seconds / the webjob stage's,
    for size bytes; names are the two labels and their details keys."""
    label, stage_label, reference_key, stage_key = names
    ratio, top, bottom, details = compare_samples(reference, stage)
    details.update({'method': method, 'bytes': size,
                    stage_key: summarise_values(stage),
                    reference_key: summarise_values(reference)})
    bench.set_figure(key, ratio, '%s %.3f s / %s %.3f s (%.0f vs %.0f MB/s, '
                     '%d runs)' % (label, top, stage_label, bottom,
                                   compute_mb_per_s(size, top),
                                   compute_mb_per_s(size, bottom),
                                   len(reference)), details)


def measure_rss(bench):
    """Peak RSS (wait4) of a fresh webjob.py for a 1 MiB and a --size job:
    GET that many bytes, write that many to stdout, PUT them."""
    ensure_big_payload(bench)
    argv = build_python_argv(bench, bench.python) + [
        WEBJOB, '-e', '-f', bench.configs['put']]
    runs = alternate_runs(bench, [
        ('1 MiB job', argv + ['small.sh', str(MIB)], None, None),
        ('size job', argv + ['big.sh', str(bench.size)], None, None)],
        bench.plan['rss'], lambda label: settle_disk(bench))
    settle_disk(bench)
    small = compute_median([r.maxrss_mib for r in runs['1 MiB job']])
    large = compute_median([r.maxrss_mib for r in runs['size job']])
    bench.set_figure('rss_small_mb', small, 'peak RSS of a 1 MiB job (GET, '
                     'output, PUT 1 MiB each), MiB', {
                         'runs': len(runs['1 MiB job']),
                         'wall_s': summarise_values(
                             [r.wall for r in runs['1 MiB job']])})
    bench.set_figure('rss_large_mb', large, 'peak RSS of a %d-byte job; large '
                     '- small = %.1f MiB' % (bench.size, large - small), {
                         'runs': len(runs['size job']),
                         'delta_mib': round(large - small, 2),
                         'wall_s': summarise_values(
                             [r.wall for r in runs['size job']])})


###############################################################################
# Measurements: server ########################################################
###############################################################################

def measure_serve_rps(bench):
    """Keep-alive GETs/s: nph_webjob.py serve vs a bare http.server."""
    port, ours_port = start_baseline_server(bench), bench.server_port
    check_serves(bench, ours_port, CGI_PATH, 'nph_webjob.py serve')
    check_serves(bench, port, CGI_PATH, 'the http.server reference')
    log_path = os.path.join(bench.server_root, 'logfiles', 'nph-webjob.log')
    before = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    results = compare_rates(bench, [
        ('nph_webjob.py serve', ours_port,
         build_get_request(bench, ours_port, CGI_PATH, 'tiny.sh')),
        ('http.server', port,
         build_get_request(bench, port, CGI_PATH, 'tiny.sh'))],
        bench.plan['seconds'])
    after = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    ours = describe_rates(results['nph_webjob.py serve'])
    base = describe_rates(results['http.server'])
    # Not part of the ratio: the client's own pattern, one connection per
    # request (Connection: close), shows listen-backlog stalls (max_ms).
    closing = LoadGenerator(ours_port, build_get_request(
        bench, ours_port, CGI_PATH, 'tiny.sh', close=True)).run(
            bench.plan['warmup'], bench.plan['seconds'])
    bench.set_figure('serve_rps_ratio', ours['rps'] / base['rps'],
                     'nph_webjob.py serve %.0f req/s (p99 %s ms) / http.server'
                     ' %.0f req/s (p99 %s ms), %d keep-alive clients' % (
                         ours['rps'], ours['p99_ms'], base['rps'],
                         base['p99_ms'], CONNECTIONS), {
                         'server': ours, 'http_server': base,
                         'server_connection_close': closing,
                         'seconds_per_run': bench.plan['seconds'],
                         'server_log_grew_bytes': after - before})


def measure_cgi_rps(bench):
    """GETs/s through Apache: nph-webjob.cgi vs a trivial Python CGI."""
    binary = find_apache()
    if binary is None:
        bench.skip('cgi_rps_ratio', 'apache2 (with mod_cgid) is not installed;'
                   ' cgi figures skipped')
        return
    port, root = start_apache(bench, binary)
    check_serves(bench, port, CGI_PATH, 'Apache + nph-webjob.cgi')
    check_serves(bench, port, PLAIN_CGI_PATH, 'Apache + plain-file.cgi')
    results = compare_rates(bench, [
        ('nph-webjob.cgi', port,
         build_get_request(bench, port, CGI_PATH, 'tiny.sh')),
        ('plain-file.cgi', port,
         build_get_request(bench, port, PLAIN_CGI_PATH, 'tiny.sh'))],
        bench.plan['cgi_seconds'])
    ours = describe_rates(results['nph-webjob.cgi'])
    base = describe_rates(results['plain-file.cgi'])
    details = bench.details.pop('cgi', {})
    details.update({'nph_webjob_cgi': ours, 'plain_cgi': base,
                    'seconds_per_run': bench.plan['cgi_seconds'],
                    'error_log': read_tail(os.path.join(root, 'error.log'),
                                           3)})
    bench.set_figure('cgi_rps_ratio', ours['rps'] / base['rps'],
                     'nph-webjob.cgi %.0f req/s (p99 %s ms) / trivial CGI '
                     '%.0f req/s (p99 %s ms), Apache event+mod_cgid' % (
                         ours['rps'], ours['p99_ms'], base['rps'],
                         base['p99_ms']), details)


###############################################################################
# Orchestration ###############################################################
###############################################################################

class Bench(object):
    """Settings, results and everything to clean up."""

    def __init__(self, args):
        self.args = args
        self.plan = PLANS['quick' if args.quick else 'full']
        self.size = args.size
        self.python = args.python
        self.flags = ['-I'] if args.site else ['-I', '-S']
        self.env = build_environment()
        self.figures = {}
        self.notes = {}
        self.details = {}
        self.errors = {}
        self.skipped = {}
        self.splits = {}
        self.meta = {}
        self.cleanups = []
        self.running = set()
        self.workspace = None
        self.server_root = None
        self.server_port = None
        self.server_error = None
        self.big_path = None
        self.configs = {}
        self.version_string = 'webjob 1.0.0 ssl dsv 64 bit'

    def set_figure(self, key, value, note, details=None):
        self.figures[key] = round(value, 3)
        self.notes[key] = note
        if details is not None:
            self.details[key] = details

    def skip(self, key, reason):
        self.skipped[key] = reason
        log_progress('%s skipped: %s' % (key, reason))

    def attempt(self, keys, function, *args):
        """Run one measurement; a failure is recorded, not raised."""
        log_progress('measuring %s' % ', '.join(keys))
        try:
            function(self, *args)
        except BenchError as exc:
            self.fail(keys, str(exc))
        except OSError as exc:
            self.fail(keys, '%s: %s' % (type(exc).__name__, exc))
        except (ValueError, KeyError, ZeroDivisionError, TypeError) as exc:
            self.fail(keys, 'internal error: %s: %s' % (type(exc).__name__,
                                                        exc))

    def fail(self, keys, message):
        for key in keys:
            if key not in self.figures and key not in self.skipped:
                self.errors[key] = message
                log_progress('%s failed: %s' % (key, message))

    def clean_up(self):
        """Kill timed children still running, then undo setup in reverse."""
        for proc in list(self.running):
            kill_process(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        while self.cleanups:
            action = self.cleanups.pop()
            try:
                action()
            except Exception as exc:  # keep cleaning up
                log_progress('cleanup: %s: %s' % (type(exc).__name__, exc))


def check_prerequisites(bench):
    """What every figure needs: webjob.py, the interpreter, curl."""
    if not os.path.isfile(WEBJOB):
        raise BenchError('%s does not exist' % WEBJOB)
    version = probe_version(bench, bench.python)
    if version is None:
        raise BenchError('--python %s does not run' % bench.python)
    bench.meta['python_version'] = '%d.%d.%d' % version
    server_version = probe_version(bench, bench.args.server_python)
    if server_version is None:
        raise BenchError('--server-python %s does not run'
                         % bench.args.server_python)
    bench.meta['server_python_version'] = '%d.%d.%d' % server_version
    for tool in ('curl', 'sh', 'head', 'tee', 'md5sum'):
        if shutil.which(tool, path=bench.env.get('PATH')) is None:
            raise BenchError('%s is not installed' % tool)
    out = subprocess.check_output(build_python_argv(bench, bench.python) + [
        WEBJOB, '-v'], env=bench.env, stdin=subprocess.DEVNULL, timeout=60)
    bench.version_string = out.decode('utf-8', 'replace').strip()
    return version


def run_client_figures(bench, python, version, suffix):
    """startup, tiny job and its split for one interpreter."""
    bench.attempt(['startup_ratio' + suffix], measure_startup, python,
                  'startup_ratio' + suffix)
    if bench.server_port is None:
        bench.fail(['tiny_job_ratio' + suffix], bench.server_error)
        return
    bench.attempt(['tiny_job_ratio' + suffix], measure_tiny_job, python,
                  'tiny_job_ratio' + suffix)

    def split(bench):
        bench.splits['%d.%d.%d' % version] = split_tiny_job(bench, python,
                                                            version)
    bench.attempt(['tiny_job_split' + suffix], split)


def run_all(bench):
    """Every figure, in an order that keeps the big files for the end."""
    server_keys = ['get_ratio', 'put_ratio', 'capture_ratio', 'rss_small_mb',
                   'rss_large_mb', 'serve_rps_ratio']
    try:
        version = check_prerequisites(bench)
        create_workspace(bench)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        bench.fail([key for key, op, bound, goal in FIGURES], str(exc))
        return
    try:
        start_standalone_server(bench)
        write_small_payloads(bench)
        bench.configs = {
            'tiny': write_client_config(bench, 'tiny.cfg'),
            'get': write_client_config(bench, 'get.cfg', put=False,
                                       unlink_executable=False),
            'put': write_client_config(bench, 'put.cfg')}
    except (BenchError, OSError) as exc:
        bench.server_port = None
        bench.server_error = 'standalone server: %s' % exc
    run_client_figures(bench, bench.python, version, '')
    py36 = probe_version(bench, PY36)
    if py36 is None:
        for key in ('startup_ratio_py36', 'tiny_job_ratio_py36'):
            bench.skip(key, '%s is not installed' % PY36)
    else:
        run_client_figures(bench, PY36, py36, '_py36')
    if bench.server_port is None:
        bench.fail(server_keys + ['cgi_rps_ratio'], bench.server_error)
        return
    bench.attempt(['serve_rps_ratio'], measure_serve_rps)
    bench.attempt(['cgi_rps_ratio'], measure_cgi_rps)
    bench.attempt(['get_ratio'], measure_get)
    bench.attempt(['capture_ratio', 'put_ratio'], measure_capture_and_put)
    bench.attempt(['rss_small_mb', 'rss_large_mb'], measure_rss)


###############################################################################
# Report ######################################################################
###############################################################################

def judge_figure(bench, key, op, bound):
    """'ok', 'MISS', 'skip', 'ERROR' or '' (no goal)."""
    if key in bench.skipped:
        return 'skip'
    if key in bench.errors:
        return 'ERROR'
    value = bench.figures.get(key)
    if value is None or op is None:
        return ''
    if op == '<=':
        return 'ok' if value <= bound else 'MISS'
    if op == '>=':
        return 'ok' if value >= bound else 'MISS'
    small = bench.figures.get('rss_small_mb')
    if small is None:
        return ''
    return 'ok' if value - small < bound else 'MISS'


def build_report(bench):
    """The JSON object: every figure by its key, then the supporting data."""
    report = {}
    for key, op, bound, goal in FIGURES:
        report[key] = bench.figures.get(key)
    report['goals'] = dict((key, goal) for key, op, bound, goal in FIGURES)
    report['results'] = dict((key, judge_figure(bench, key, op, bound))
                             for key, op, bound, goal in FIGURES)
    report['missed'] = [key for key, status in sorted(
        report['results'].items()) if status == 'MISS']
    report['tiny_job_split_ms'] = bench.splits
    report['details'] = bench.details
    report['errors'] = bench.errors
    report['skipped'] = bench.skipped
    report['meta'] = dict(bench.meta, **{
        'python': bench.python, 'flags': ' '.join(bench.flags),
        'server_python': bench.args.server_python,
        'size': bench.size, 'plan': 'quick' if bench.args.quick else 'full',
        'cpus': os.cpu_count(), 'connections': CONNECTIONS})
    return report


def format_table(bench, report):
    meta = report['meta']
    lines = ['webjob.py benchmark: python %s (%s %s), servers on python %s, '
             'payload %d bytes (%.0f MiB), %s CPUs, %s plan; medians' % (
                 meta.get('python_version', '?'), meta['python'],
                 meta['flags'], meta.get('server_python_version', '?'),
                 meta['size'], meta['size'] / MIB, meta['cpus'], meta['plan']),
             'load average (1 min) before the run: %.2f%s' % (
                 meta['load_average_before'],
                 ': other work shares the CPUs and the figures'
                 if meta['load_average_before'] > 0.5 else ''),
             '',
             '%-20s %8s  %-17s %-6s %s' % ('figure', 'value', 'goal', 'result',
                                           'measured'),
             '-' * 110]
    for key, op, bound, goal in FIGURES:
        value = report[key]
        shown = '-' if value is None else ('%.1f' % value if key.startswith(
            'rss') else '%.2f' % value)
        note = bench.notes.get(key) or bench.errors.get(key) or \
            bench.skipped.get(key) or ''
        lines.append('%-20s %8s  %-17s %-6s %s' % (
            key, shown, goal, report['results'][key], note))
    for version, split in sorted(report['tiny_job_split_ms'].items()):
        lines += ['', 'tiny job time split, python %s (median of %d driver '
                  'runs, ms):' % (version, split['runs'])]
        for name, label in SPLIT_ROWS:
            share = 100.0 * split[name] / split['total'] if split['total'] \
                else 0.0
            lines.append('  %-42s %8.2f  %5.1f%%' % (label, split[name],
                                                     share))
        if split['imports'] is None:
            lines.append('  imports: %s' % split['top_imports'])
        else:
            lines.append('  %-42s %8.2f  (inside the rows above)' % (
                'imports during the job (-X importtime)', split['imports']))
            lines.append('    top: ' + ', '.join(
                '%s %.2f' % (name, ms) for name, ms in split['top_imports']))
    lines += ['', 'get_ratio compares whole processes (start-up included); '
              'put_ratio and capture_ratio time the webjob stage alone by '
              'timestamps against the whole reference process.',
              'serve/cgi figures: %d keep-alive HTTP/1.1 clients on loopback, '
              'alternating runs; the client and the servers share the CPUs.'
              % CONNECTIONS]
    if report['missed']:
        lines.append('goals missed: ' + ', '.join(report['missed']))
    if bench.errors:
        lines.append('not measured: ' + ', '.join(sorted(bench.errors)))
    return '\n'.join(lines)


###############################################################################
# Main ########################################################################
###############################################################################

def raise_interrupt(signal_number, frame):
    raise KeyboardInterrupt


def main(argv=None):
    """Run every figure, print the table or JSON; 1 if one was not taken."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bench = Bench(args)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    interrupted = False
    bench.meta['load_average_before'] = round(os.getloadavg()[0], 2)
    try:
        run_all(bench)
    except KeyboardInterrupt:
        interrupted = True
        log_progress('interrupted; cleaning up')
    finally:
        bench.clean_up()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if interrupted:
        return 130
    report = build_report(bench)
    table = format_table(bench, report) + '\n'
    if args.json:   # stdout stays one JSON object; the table goes to stderr
        sys.stderr.write(table)
        sys.stdout.write(json.dumps(report, indent=1, sort_keys=True) + '\n')
    else:
        sys.stdout.write(table)
    sys.stdout.flush()
    return 1 if bench.errors else 0


if __name__ == '__main__':
    sys.exit(main())
