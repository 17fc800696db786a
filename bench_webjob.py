#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""bench_webjob.py -- how fast webjob.py and nph_webjob.py are, beside C tools.

    python3 bench_webjob.py [--quick] [--json] [--size BYTES] [--python PATH]

Prints the README's speed figures as ratios against a reference (the bare
interpreter, curl, sh and coreutils for the client; a bare http.server and
a trivial CGI for the server), so that a shared machine's drift cancels.
Goal misses are printed, not failures: the exit status is 1 only when a
figure could not be measured at all (a missing Python 3.6 skips its
figures; a missing apache2 or non-root user skips the CGI figure).

Thin on purpose: the servers are started by the tests' own launchers
(conftest.py: start_standalone, ApacheServer), queries are built by
webjob.py's build_query, short commands are timed by hyperfine, load is
made by ab (apache2-utils), and webjob.py is run only through its command
line, so that renaming a function inside it cannot break this file.

Interpreters run with -I -S unless --site is given: this machine's pyenv
installs carry a site-packages .pth hook that imports certifi on every
start, which is no part of either program.

To add a figure: one row in FIGURES (its --json key and goal), one
measure_* function that calls bench.set_figure, one row in MEASUREMENTS.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True          # no __pycache__ in the repository
sys.path.insert(0, HERE)

import webjob  # noqa: E402  (the client's query helpers)


###############################################################################
# Constants ###################################################################
###############################################################################

WEBJOB = os.path.join(HERE, 'webjob.py')
NPH_WEBJOB = os.path.join(HERE, 'nph_webjob.py')
PY36 = '/root/.pyenv/versions/3.6.15/bin/python'
MIB = 1 << 20
LOOPBACK = '127.0.0.1'
CLIENT_ID = 'client_1'                  # conftest's server tree and htpasswd
PASSWORD = 'secret-1'
CONNECTIONS = 16
COMMAND_TIMEOUT = 900.0
TIME = '/usr/bin/time'                  # GNU time, for peak RSS

TINY_OUTPUT = b'webjob bench tiny job\n'
TINY_SCRIPT = b'#!/bin/sh\necho webjob bench tiny job\n'
OUT_SCRIPT = b'#!/bin/sh\nexec head -c "$1" /dev/zero\n'
PAYLOAD_HEAD = b'#!/bin/sh\n[ -z "$1" ] || head -c "$1" /dev/zero\nexit 0\n'
PAD_LINE = b'#' * 63 + b'\n'            # sh never reads past `exit 0`

CURL = ['curl', '-sSf', '--noproxy', '*']
SHELL_JOB = ('curl -sSf --noproxy "*" -o "$1" "$2" && sh "$1" > "$3" 2> "$4" '
             '&& curl -sSf --noproxy "*" -H "Expect:" -o /dev/null '
             '-T "$3" "$5"')
TEE_MD5 = 'head -c "$1" /dev/zero | tee "$2" | md5sum'

#: Repetitions per plan; rounds alternate the compared commands.
PLANS = {
    'quick': {'runs': 6, 'rounds': 1, 'transfer': 2, 'rss': 1,
              'seconds': 1, 'size': 8 * MIB, 'jobs': 60,
              'real_clients': False, 'stream_sizes': (), 'wave': 200},
    'full': {'runs': 30, 'rounds': 3, 'transfer': 5, 'rss': 3,
             'seconds': 5, 'size': 1 << 30, 'jobs': 300,
             'real_clients': True,
             'stream_sizes': (2 << 30, 8 << 30),    # besides --size
             'wave': 2000},
}

#: The figures: --json key, comparison, bound (None: no goal).
FIGURES = (
    ('startup_vs_bare', '<=', 4.0),
    ('startup_vs_bare_py36', '<=', 4.0),
    ('tiny_job_ratio', '<=', 3.0),
    ('tiny_job_ratio_py36', '<=', 3.0),
    ('get_ratio', '>=', 0.9),
    ('put_ratio', '>=', 0.9),
    ('capture_ratio', '>=', 0.8),
    ('rss_small_mb', None, None),
    ('rss_large_mb', 'delta<', 10.0),        # large - rss_small_mb
    ('serve_rps_ratio', '>=', 0.8),
    ('cgi_rps_ratio', '>=', 0.8),
    ('tls_put_ratio', '>=', 0.9),
    ('retry_cycle_ms', None, None),
    ('cgi_import_vs_bare', None, None),
    ('job_request_ms', None, None),
    ('hunt_300_s', None, None),
    ('stream_disk_peak_mib', '<=', 64.0),
    ('stream_rss_mib', None, None),
    ('stream_ratio', '>=', 0.8),
    ('resume_ratio', '>=', 0.8),
    ('load_standalone_jobs_s', None, None),
    ('load_standalone_p99_ms', None, None),
    ('load_apache_jobs_s', None, None),
    ('load_apache_p99_ms', None, None),
    ('load_nginx_jobs_s', None, None),
    ('load_nginx_p99_ms', None, None),
    ('jobs_per_hour', None, None),
    ('server_peak_rss_mb', None, None),
    ('small_put_vs_dav', '>=', 0.5),
    ('large_put_vs_dav', '>=', 0.5),
)
SMALL_PUT = 4096                        # bytes of the small-PUT comparison
LARGE_PUT = 2 << 30                     # bytes of the large one (full plan)
HUNT_CLIENTS = 300                      # the figure, both plans


class BenchError(Exception):
    """A figure could not be measured; the message says why."""


###############################################################################
# Running and timing ##########################################################
###############################################################################

def log_progress(text):
    """Progress goes to stderr, so --json keeps stdout to one object."""
    sys.stderr.write('bench: %s\n' % text)
    sys.stderr.flush()


def build_environment():
    """No proxies, no PYTHON* variables, a UTF-8 locale (Python 3.6 would
    read webjob.py as ASCII under C)."""
    env = dict((key, value) for key, value in os.environ.items()
               if not key.lower().endswith('_proxy')
               and not key.startswith(('PYTHON', 'LC_')))
    env['LC_ALL'] = 'C.UTF-8'
    return env


def run_checked(bench, argv, what=None):
    """Run a helper tool to the end; its stdout, or BenchError."""
    proc = subprocess.Popen(argv, env=bench.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    if proc.returncode != 0:
        tail = ' | '.join(err.decode('utf-8', 'replace').splitlines()[-3:])
        raise BenchError('%s exited %d: %s' % (what or argv[0],
                                               proc.returncode, tail))
    return out.decode('utf-8', 'replace')


def run_timed(bench, argv):
    """One child: (wall seconds, peak RSS in MiB, epoch at its end).  GNU
    time measures the RSS: a child forked from this process would inherit
    this process's high-water mark in its own wait4 figure."""
    report = os.path.join(bench.workspace, 'time.out')
    started = time.monotonic()
    run_checked(bench, [TIME, '-f', '%M', '-o', report] + argv,
                ' '.join(argv[:5]))
    wall, ended = time.monotonic() - started, time.time()
    with open(report) as handle:
        kib = int(handle.read().split()[-1])
    return wall, kib / 1024.0, ended


def time_commands(bench, commands, runs=None):
    """({label: [wall seconds, ...]}, {label: mean CPU seconds}): hyperfine
    -N runs the (label, argv) commands in plan['rounds'] alternating rounds,
    after one warm-up each.  CPU (user + system) drifts less than wall time
    on a loaded machine, so the notes give both."""
    runs = runs or bench.plan['runs']
    per_round = max(2, -(-runs // bench.plan['rounds']))
    times = dict((label, []) for label, argv in commands)
    cpu = dict((label, []) for label, argv in commands)
    out = os.path.join(bench.workspace, 'hyperfine.json')
    for _ in range(bench.plan['rounds']):
        argv = ['hyperfine', '-N', '--style', 'none', '--warmup', '1',
                '--runs', str(per_round), '--export-json', out]
        for label, command in commands:
            argv += ['-n', label, ' '.join(shlex.quote(w) for w in command)]
        run_checked(bench, argv)
        with open(out) as handle:
            for result in json.load(handle)['results']:
                times[result['command']].extend(result['times'])
                cpu[result['command']].append(result['user'] +
                                              result['system'])
    return times, dict((label, median(found)) for label, found in cpu.items())


def time_alternately(bench, commands, count):
    """{label: [(wall, rss, epochs), ...]} for long commands, run A B A B
    ... with settled disks in between (hyperfine cannot settle them);
    epochs are a job's stage epochs from its .env record (or None)."""
    results = dict((label, []) for label, argv in commands)
    for _ in range(count):
        for label, argv in commands:
            settle_disk(bench)
            wall, rss, ended = run_timed(bench, argv)
            epochs = read_stage_epochs(bench, ended)
            results[label].append((wall, rss, epochs))
    settle_disk(bench)
    return results


def median(values):
    ordered = sorted(values)
    if not ordered:
        raise BenchError('no values to take a median of')
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2.0


def python_argv(bench, python):
    return [python] + bench.flags


def probe_version(bench, python):
    """'3.6.15' for an interpreter, or None when it cannot run."""
    if not os.access(python, os.X_OK):
        return None
    try:
        return run_checked(bench, python_argv(bench, python) + [
            '-c', 'import platform; print(platform.python_version())'
        ]).strip()
    except (OSError, BenchError):
        return None


###############################################################################
# Workspace, payloads and URLs ################################################
###############################################################################

def write_file(path, data, mode=0o644):
    with open(path, 'wb') as handle:
        handle.write(data)
    os.chmod(path, mode)
    return path


def read_bytes(path):
    with open(path, 'rb') as handle:
        return handle.read()


def write_padded_script(path, head, size):
    """A script of exactly size bytes: head, then comment lines (never run)."""
    block = PAD_LINE * (MIB // len(PAD_LINE))
    left = size - len(head)
    with open(path, 'wb') as handle:
        handle.write(head)
        while left > 0:
            left -= handle.write(block[:left])
    return path


def commands_dir(bench):
    return os.path.join(bench.server.root, 'profiles', CLIENT_ID, 'commands')


def write_payloads(bench):
    """tiny.sh (2 lines), out.sh (writes $1 bytes), small.sh (1 MiB)."""
    folder = commands_dir(bench)
    write_file(os.path.join(folder, 'tiny.sh'), TINY_SCRIPT)
    write_file(os.path.join(folder, 'out.sh'), OUT_SCRIPT)
    write_padded_script(os.path.join(folder, 'small.sh'), PAYLOAD_HEAD, MIB)


def ensure_big_payload(bench):
    """big.sh: --size bytes; exits at once, or writes $1 bytes."""
    path = os.path.join(commands_dir(bench), 'big.sh')
    if not os.path.exists(path):
        stat = os.statvfs(bench.workspace)
        need = 4 * bench.size + 256 * MIB
        if stat.f_bavail * stat.f_frsize < need:
            raise BenchError('not enough disk space in %s for --size %d'
                             % (bench.workspace, bench.size))
        log_progress('writing the %d-byte payload' % bench.size)
        write_padded_script(path, PAYLOAD_HEAD, bench.size)
    return path


def write_client_config(bench, name, put=True, extra=()):
    """A webjob.py config against the standalone server."""
    lines = ['ClientId=%s' % CLIENT_ID, 'URLGetURL=%s' % bench.server.cgi_url,
             'TempDirectory=%s' % bench.client_dir, 'OverwriteExecutable=Y',
             'UnlinkExecutable=Y', 'UnlinkOutput=Y'] + list(extra)
    lines += ['%sTimeLimit=%d' % (stage, COMMAND_TIMEOUT)
              for stage in ('Get', 'Run', 'Put')]
    if put:
        lines.append('URLPutURL=%s' % bench.server.cgi_url)
    path = os.path.join(bench.workspace, name)
    write_file(path, ('\n'.join(lines) + '\n').encode('ascii'))
    return path


def job_url(base, filename, lengths=None):
    """The client's GET (or, with lengths, PUT) URL, by webjob.py's own
    build_query."""
    pairs = [('VERSION', webjob.version_string()),
             ('SYSTEM', webjob.system_string()), ('CLIENTID', CLIENT_ID),
             ('FILENAME', filename), ('RUNTYPE', 'snapshot')]
    if lengths is not None:
        pairs += zip(('STDOUT_LENGTH', 'STDERR_LENGTH', 'STDENV_LENGTH'),
                     lengths)
    return '%s?%s' % (base, webjob.build_query(pairs))


def read_stage_epochs(bench, ended):
    """{'Get': s, 'Run': s, 'Put': s, 'End': s} from the .env record a
    job uploaded (the original's GetEpoch/RunEpoch/PutEpoch, which end in
    '(seconds.micros)'); None when no job uploaded one."""
    incoming = os.path.join(bench.server.root, 'incoming')
    names = [name for name in os.listdir(incoming) if name.endswith('.env')]
    if len(names) != 1:
        return None
    epochs = {'End': ended}
    with open(os.path.join(incoming, names[0])) as handle:
        for line in handle:
            key, _, value = line.partition('=')
            if key in ('GetEpoch', 'RunEpoch', 'PutEpoch'):
                epochs[key[:3]] = float(value.rsplit('(', 1)[1].rstrip(')\n'))
    return epochs


def clear_folder(path):
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full):
            shutil.rmtree(full, True)
        else:
            os.unlink(full)


def settle_disk(bench):
    """Before a timed bulk run: drop last run's files, flush dirty pages."""
    clear_folder(os.path.join(bench.server.root, 'incoming'))
    clear_folder(bench.client_dir)
    clear_folder(bench.work_dir)
    os.sync()


###############################################################################
# Servers #####################################################################
###############################################################################

# The reference server: a bare http.server, HTTP/1.1, serving one file.
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
        if self.request_version == 'HTTP/1.0' and not self.close_connection:
            self.send_header('Connection', 'keep-alive')   # as serve does
        self.end_headers()
        self.wfile.write(body)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


Server(('127.0.0.1', PORT), Handler).serve_forever()
'''

# The reference CGI: the stub's own interpreter line, prints the file.
PLAIN_CGI = r'''
import sys
with open(%r, 'rb') as handle:
    body = handle.read()
sys.stdout.buffer.write(b'Content-Type: application/octet-stream\r\n'
                        b'Content-Length: %%d\r\n\r\n' %% len(body) + body)
'''


def load_conftest():
    """The tests' launchers (conftest.py imports pytest)."""
    try:
        import conftest
    except ImportError as exc:
        raise BenchError('conftest.py needs pytest: %s' % exc)
    return conftest


def start_servers(bench):
    """nph_webjob.py serve (conftest's launcher) and the payloads."""
    conftest = load_conftest()
    work = os.path.join(bench.workspace, 'serve')
    config = write_file(os.path.join(work, 'nph-webjob.cfg'),
                        b'PartialUploadEnable = Y\n')
    bench.server = conftest.start_standalone(work, bench.server_python,
                                             args=['--config', config])
    bench.cleanups.append(lambda: conftest.stop_process(bench.server.proc))
    write_payloads(bench)
    bench.configs = {'job': write_client_config(bench, 'job.cfg'),
                     'noput': write_client_config(bench, 'noput.cfg', False),
                     'stream': write_client_config(bench, 'stream.cfg', extra=[
                         'UploadMode=streamed'])}


def start_baseline(bench, path):
    """The bare http.server, serving path for any GET; its base URL."""
    conftest = load_conftest()
    script = write_file(os.path.join(bench.workspace, 'baseline.py'),
                        BASELINE_SERVER.encode('utf-8'))
    port = conftest.free_port()
    proc = subprocess.Popen(python_argv(bench, bench.server_python) + [
        script, str(port), path], env=bench.env, stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    bench.cleanups.append(lambda: conftest.stop_process(proc))
    conftest.wait_for_port(LOOPBACK, port, proc=proc)
    return 'http://%s:%d/cgi-client/plain' % (LOOPBACK, port)


def check_serves(bench, url, expected, what, auth=None):
    """A server must answer a WebJob GET with the program, byte for byte."""
    argv = CURL + (['-u', auth] if auth else []) + [url]
    if run_checked(bench, argv, what).encode('utf-8') != expected:
        raise BenchError('%s did not serve the program' % what)


def load_with_ab(bench, url, seconds, auth=None, put=None):
    """ab's figures for CONNECTIONS keep-alive clients over seconds (GETs,
    or PUTs of the file put): {'rps', 'p50_ms', 'p99_ms', 'complete',
    'failed', 'non_2xx'}."""
    argv = ['ab', '-k', '-c', str(CONNECTIONS), '-t', str(seconds), '-n',
            '100000000'] + (['-A', auth] if auth else []) + (
        ['-u', put, '-T', 'application/octet-stream'] if put else []) + [url]
    figures = {'failed': 0, 'non_2xx': 0}
    for line in run_checked(bench, argv).splitlines():
        words = line.split()
        if line.startswith('Requests per second:'):
            figures['rps'] = float(words[3])
        elif line.startswith('Complete requests:'):
            figures['complete'] = int(words[2])
        elif line.startswith('Failed requests:'):
            figures['failed'] = int(words[2])
        elif line.startswith('Non-2xx responses:'):
            figures['non_2xx'] = int(words[2])
        elif line.startswith(('  50%', '  99%')):
            figures['p%s_ms' % words[0].rstrip('%')] = int(words[1])
    if not figures.get('complete') or figures['non_2xx']:
        raise BenchError('ab %s: %r' % (url.split('?')[0], figures))
    return figures


def compare_load(bench, targets, seconds, auth=None):
    """Alternate ab runs over (label, url); the median run of each."""
    runs = dict((label, []) for label, url in targets)
    for _ in range(bench.plan['rounds']):
        for label, url in targets:
            runs[label].append(load_with_ab(bench, url, seconds, auth))
    return dict((label, sorted(found, key=lambda f: f['rps'])[len(found) // 2])
                for label, found in runs.items())


###############################################################################
# Measurements: client ########################################################
###############################################################################

def tiny_job_argv(bench, python, config='job'):
    return python_argv(bench, python) + [WEBJOB, '-e', '-f',
                                         bench.configs[config], 'tiny.sh']


def set_time_ratio(bench, key, timed, top, bottom, note):
    """key = median wall time of command top / of command bottom; note gets
    both in ms, then the same ratio in CPU time."""
    times, cpu = timed
    a, b = median(times[top]), median(times[bottom])
    bench.set_figure(key, a / b, note % (a * 1e3, b * 1e3) + (
        '; CPU %.1f / %.1f ms = %.2fx' % (cpu[top] * 1e3, cpu[bottom] * 1e3,
                                          cpu[top] / cpu[bottom])))


def measure_startup(bench, key, python):
    """webjob.py -v against the bare interpreter, same flags."""
    argv = python_argv(bench, python)
    timed = time_commands(bench, [('bare', argv + ['-c', 'pass']),
                                  ('webjob -v', argv + [WEBJOB, '-v'])])
    set_time_ratio(bench, key, timed, 'webjob -v', 'bare', 'webjob.py -v '
                   '%%.1f ms / python %s -c pass %%.1f ms' % ' '.join(
                       bench.flags))


def measure_tiny_job(bench, key, python):
    """One whole webjob.py -e job against curl -o, sh, curl -T."""
    work, base = bench.work_dir, bench.server.cgi_url
    shell = ['sh', '-c', SHELL_JOB, 'sh', os.path.join(work, 'tiny.sh'),
             job_url(base, 'tiny.sh'), os.path.join(work, 'tiny.out'),
             os.path.join(work, 'tiny.err'),
             job_url(base, 'tiny.sh', (len(TINY_OUTPUT), 0, 0))]
    timed = time_commands(bench, [('webjob', tiny_job_argv(bench, python)),
                                  ('shell', shell)])
    clear_folder(os.path.join(bench.server.root, 'incoming'))
    set_time_ratio(bench, key, timed, 'webjob', 'shell', 'webjob.py -e %.1f '
                   'ms / curl -o, sh, curl -T %.1f ms')


#: What a plain http job loads of webjob.py's deferred sections
#: (test_client_sections.py pins the same list) and the standard modules it
#: imports (-X importtime of one job).
JOB_SECTIONS = ('Transport', 'Stages', 'Modes')
JOB_IMPORTS = ('_signal', '_socket', 'hashlib', '_thread', 'select', 'fcntl')


def measure_tiny_job_split(bench, key, python):
    """Where a tiny job's time goes, by differences of whole processes, each
    adding one step to the one before; imports from -X importtime."""
    argv = python_argv(bench, python)
    source = "compile(open(%r).read(), %r, 'exec')" % (WEBJOB, WEBJOB)
    body = "g = {'__name__': 'bench', '__file__': %r}; exec(%s, g)" % (
        WEBJOB, source)
    loads = body + '; ' + '; '.join("g['load_section'](%r)" % name
                                    for name in JOB_SECTIONS)
    steps = [('interpreter start and exit', argv + ['-c', 'pass']),
             ('read + compile webjob.py (plain code)', argv + ['-c', source]),
             ('module body (definitions, stubs)', argv + ['-c', body]),
             ('compile the sections a job loads', argv + ['-c', loads]),
             ('standard modules a job imports', argv + [
                 '-c', loads + '; import ' + ', '.join(JOB_IMPORTS)]),
             ('config, GET, RUN (no PUT)',
              tiny_job_argv(bench, python, 'noput')),
             ('PUT', tiny_job_argv(bench, python))]
    times, cpu = time_commands(bench, steps)
    clear_folder(os.path.join(bench.server.root, 'incoming'))
    split, wall_before, cpu_before = [['(ms)', 'wall', 'CPU']], 0.0, 0.0
    for label, command in steps:
        wall = median(times[label])
        split.append([label, round((wall - wall_before) * 1e3, 2),
                      round((cpu[label] - cpu_before) * 1e3, 2)])
        wall_before, cpu_before = wall, cpu[label]
    split.append(['whole job', round(wall_before * 1e3, 2),
                  round(cpu_before * 1e3, 2)])
    if tuple(map(int, bench.versions[python].split('.')[:2])) >= (3, 7):
        split += top_imports(bench, tiny_job_argv(bench, python))
    bench.set_split(key, split)


def top_imports(bench, argv):
    """The slowest top-level imports of one run (-X importtime), in ms."""
    proc = subprocess.Popen(argv[:1] + ['-X', 'importtime'] + argv[1:],
                            env=bench.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.communicate(timeout=COMMAND_TIMEOUT)[1].decode('utf-8',
                                                              'replace')
    found = []
    for line in err.splitlines():
        fields = line.split('|')
        if line.startswith('import time:') and len(fields) == 3 and \
                fields[1].strip().isdigit() and not fields[2][1:2].isspace():
            found.append((int(fields[1]) / 1e3, fields[2].strip()))
    total = sum(ms for ms, name in found)
    return [['imports, all (-X importtime, one run)', round(total, 2)]] + [
        ['  import %s' % name, round(ms, 2)] for ms, name in
        sorted(found, reverse=True)[:6]]


def measure_get(bench, key):
    """GET of a --size program that exits at once, whole processes:
    curl -o / webjob.py -e, both into TempDirectory."""
    ensure_big_payload(bench)
    results = time_alternately(bench, [
        ('webjob', python_argv(bench, bench.python) + [
            WEBJOB, '-e', '-f', bench.configs['noput'], 'big.sh']),
        ('curl', CURL + ['-o', os.path.join(bench.client_dir, 'big.curl'),
                         job_url(bench.server.cgi_url, 'big.sh')])],
        bench.plan['transfer'])
    ours = median([found[0] for found in results['webjob']])
    curl = median([found[0] for found in results['curl']])
    bench.set_figure(key, curl / ours, 'whole processes: curl -o %.3f s / '
                     'webjob.py -e %.3f s for %d bytes' % (curl, ours,
                                                           bench.size))


def measure_capture_and_put(bench, key):
    """The RUN stage capturing and MD5-hashing --size bytes / head | tee |
    md5sum, and the PUT stage sending them / curl -T of a file that size;
    the stages timed by the job's own .env epochs (RunEpoch to PutEpoch,
    PutEpoch to the process's end), the references as whole processes."""
    big = ensure_big_payload(bench)
    results = time_alternately(bench, [
        ('job', python_argv(bench, bench.python) + [
            WEBJOB, '-e', '-f', bench.configs['job'], 'out.sh',
            str(bench.size)]),
        ('tee', ['sh', '-c', TEE_MD5, 'sh', str(bench.size),
                 os.path.join(bench.work_dir, 'cap.out')]),
        ('curl', CURL + ['-H', 'Expect:', '-o', '/dev/null', '-T', big,
                         job_url(bench.server.cgi_url, 'big.sh',
                                 (bench.size, 0, 0))])],
        bench.plan['transfer'])
    epochs = [found[2] for found in results['job']]
    if None in epochs:
        raise BenchError('a job uploaded no .env record')
    run = median([e['Put'] - e['Run'] for e in epochs])
    put = median([e['End'] - e['Put'] for e in epochs])
    tee = median([found[0] for found in results['tee']])
    curl = median([found[0] for found in results['curl']])
    bench.set_figure(key, tee / run, 'head|tee|md5sum %.3f s / RUN stage '
                     '%.3f s (RunEpoch to PutEpoch)' % (tee, run))
    bench.set_figure('put_ratio', curl / put, 'curl -T %.3f s / PUT stage '
                     '%.3f s (PutEpoch to the end of the process)'
                     % (curl, put))


def start_tls_server(bench):
    """A second standalone server over TLS (a self-signed certificate)
    on the same BaseDirectory, so the stage epochs are read as for HTTP."""
    conftest = load_conftest()
    folder = os.path.join(bench.workspace, 'tls')
    os.mkdir(folder)
    cert, key = (os.path.join(folder, name) for name in ('cert.pem',
                                                         'key.pem'))
    run_checked(bench, ['openssl', 'req', '-x509', '-newkey', 'rsa:2048',
                        '-nodes', '-keyout', key, '-out', cert, '-subj',
                        '/CN=webjob.test', '-days', '2'], 'openssl req')
    server = conftest.start_standalone(folder, bench.server_python,
                                       root=bench.server.root, args=[
                                           '--tls-cert', cert, '--tls-key',
                                           key])
    bench.cleanups.append(lambda: conftest.stop_process(server.proc))
    return 'https://%s:%d%s' % (LOOPBACK, server.port, conftest.CGI_PATH)


def measure_tls_put(bench, key):
    """The PUT stage sending --size bytes over TLS / curl -k -T of a file
    that size to the same https server (both certificate checks off).  The
    job keeps its output (UnlinkOutput=N; settle_disk removes it), so the
    stage is the upload, not also the unlink of a --size file (about 1 s
    per GiB here, which curl is not timed for)."""
    big = ensure_big_payload(bench)
    url = start_tls_server(bench)
    config = write_file(os.path.join(bench.workspace, 'tls.cfg'), read_bytes(
        bench.configs['job']).replace(bench.server.cgi_url.encode('ascii'),
                                      url.encode('ascii')).replace(
        b'UnlinkOutput=Y', b'UnlinkOutput=N'))
    results = time_alternately(bench, [
        ('job', python_argv(bench, bench.python) + [
            WEBJOB, '-e', '-f', config, 'out.sh', str(bench.size)]),
        ('curl', CURL + ['-k', '-H', 'Expect:', '-o', '/dev/null', '-T', big,
                         job_url(url, 'big.sh', (bench.size, 0, 0))])],
        bench.plan['transfer'])
    epochs = [found[2] for found in results['job']]
    if None in epochs:
        raise BenchError('a job uploaded no .env record')
    put = median([e['End'] - e['Put'] for e in epochs])
    curl = median([found[0] for found in results['curl']])
    bench.set_figure(key, curl / put, 'curl -k -T %.3f s / PUT stage %.3f s '
                     'over TLS, %d bytes, output kept' % (curl, put,
                                                          bench.size))


def measure_retry_cycle(bench, key):
    """What one retry adds to a tiny job's PUT stage: a 503 answered by
    the tests' fault proxy, then the retry (PutRetryDelay=0), against the
    same PUT through the proxy undisturbed; medians of the PUT stage
    (PutEpoch to the end of the process), in ms."""
    conftest = load_conftest()
    proxy = conftest.FaultProxy(bench.server.port)
    bench.cleanups.append(proxy.close)
    text = read_bytes(bench.configs['job']).replace(
        ('URLPutURL=' + bench.server.cgi_url).encode('ascii'),
        ('URLPutURL=' + proxy.url(conftest.CGI_PATH)).encode('ascii'))
    config = write_file(os.path.join(bench.workspace, 'retry.cfg'),
                        text + b'PutRetryCount=1\nPutRetryDelay=0\n')
    argv = python_argv(bench, bench.python) + [WEBJOB, '-e', '-f', config,
                                               'tiny.sh']
    stages = {'plain': [], 'retry': []}
    for _ in range(bench.plan['runs']):
        for label in ('plain', 'retry'):
            if label == 'retry':
                proxy.plan(conftest.FaultPlan(answer=conftest.answer_503()))
            settle_disk(bench)
            wall, rss, ended = run_timed(bench, argv)
            epochs = read_stage_epochs(bench, ended)
            if epochs is None:
                raise BenchError('a job uploaded no .env record')
            stages[label].append(epochs['End'] - epochs['Put'])
    if proxy.cuts != bench.plan['runs']:
        raise BenchError('the fault proxy answered %d of %d 503s'
                         % (proxy.cuts, bench.plan['runs']))
    plain, retry = median(stages['plain']), median(stages['retry'])
    bench.set_figure(key, (retry - plain) * 1000.0, 'PUT stage with one 503 '
                     'and a retry %.1f ms - without %.1f ms' % (
                         retry * 1000.0, plain * 1000.0))


def measure_rss(bench, key):
    """Peak RSS (wait4) of a 1 MiB job and of a --size job: GET that many
    bytes, write that many to stdout, PUT them."""
    ensure_big_payload(bench)
    argv = python_argv(bench, bench.python) + [WEBJOB, '-e', '-f',
                                               bench.configs['job']]
    results = time_alternately(bench, [
        ('small', argv + ['small.sh', str(MIB)]),
        ('large', argv + ['big.sh', str(bench.size)])], bench.plan['rss'])
    small = median([found[1] for found in results['small']])
    large = median([found[1] for found in results['large']])
    bench.set_figure('rss_small_mb', small, 'peak RSS of a 1 MiB job (GET, '
                     'output, PUT 1 MiB each), MiB')
    bench.set_figure(key, large, 'peak RSS of a %d-byte job, MiB; large - '
                     'small = %.1f MiB' % (bench.size, large - small))


def folder_bytes(path):
    """Disk blocks in use under a folder, in bytes (files vanish as they
    are read: a streamed job removes each segment once sent)."""
    total = 0
    for folder, subs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass
    return total


def watch_peak(path, stop, found):
    """Sample folder_bytes(path) until stop is set; the peak in found."""
    while not stop.wait(0.005):      # sampling interval
        found[0] = max(found[0], folder_bytes(path))


def run_watching_disk(bench, argv):
    """run_timed, with the peak disk use of TempDirectory meanwhile (MiB)."""
    import threading
    stop, found = threading.Event(), [0]
    watcher = threading.Thread(target=watch_peak, args=(bench.client_dir,
                                                        stop, found))
    watcher.start()
    try:
        wall, rss, ended = run_timed(bench, argv)
    finally:
        stop.set()
        watcher.join()
    return wall, rss, found[0] / float(MIB)


def stream_job_argv(bench, size):
    return python_argv(bench, bench.python) + [
        WEBJOB, '-e', '-f', bench.configs['stream'], 'out.sh', str(size)]


def measure_stream(bench, key):
    """UploadMode=streamed: a job writing --size bytes to stdout / 'head
    -c | curl -T -' of as many bytes to the same server (whole processes),
    with peak RSS and peak TempDirectory disk use; the disk peak also at
    the plan's larger sizes."""
    url = job_url(bench.server.cgi_url, 'out.sh', (bench.size, 0, 0))
    pipe = ('head -c "$1" /dev/zero | curl -sSf --noproxy "*" -H "Expect:" '
            '-H "Transfer-Encoding:" -H "Content-Length: $1" -o /dev/null '
            '-T - "$2"')
    walls, peaks, rss, curls = [], [], [], []
    for _ in range(bench.plan['transfer']):
        settle_disk(bench)
        wall, peak, disk = run_watching_disk(bench, stream_job_argv(
            bench, bench.size))
        walls.append(wall)
        rss.append(peak)
        peaks.append(disk)
        settle_disk(bench)
        curls.append(run_timed(bench, ['sh', '-c', pipe, 'sh',
                                       str(bench.size), url])[0])
    notes = ['%d bytes: %.1f MiB' % (bench.size, max(peaks))]
    for size in bench.plan['stream_sizes']:
        if size == bench.size:
            continue
        settle_disk(bench)
        log_progress('streaming a %d-byte job' % size)
        found = run_watching_disk(bench, stream_job_argv(bench, size))[2]
        peaks.append(found)
        notes.append('%d bytes: %.1f MiB' % (size, found))
    settle_disk(bench)
    ours, curl = median(walls), median(curls)
    bench.set_figure(key, max(peaks), 'peak TempDirectory use of a streamed '
                     'job, MiB (%s)' % ', '.join(notes))
    bench.set_figure('stream_rss_mib', median(rss), 'peak RSS of a streamed '
                     '%d-byte job, MiB' % bench.size)
    bench.set_figure('stream_ratio', curl / ours, 'head|curl -T - %.3f s / '
                     'streamed job %.3f s for %d bytes' % (curl, ours,
                                                          bench.size))


def measure_resume(bench, key):
    """UploadMode=resumable: the PUT stage of a --size job whose PATCH is
    cut half way and resumed (through the tests' fault proxy) / one curl -T
    of a file that size; the stage timed by the job's .env epochs."""
    conftest = load_conftest()
    if not hasattr(conftest, 'FaultProxy'):
        bench.skip(key, 'conftest.py has no FaultProxy to cut the upload')
        return
    big = ensure_big_payload(bench)
    proxy = conftest.FaultProxy(bench.server.port)
    bench.cleanups.append(proxy.close)
    config = write_client_config(bench, 'cut.cfg', put=False, extra=[
        'UploadMode=resumable', 'URLPutURL=%s' % proxy.url(
            '/cgi-client/nph-webjob.cgi')])
    job = python_argv(bench, bench.python) + [WEBJOB, '-e', '-f', config,
                                              'out.sh', str(bench.size)]
    curl = CURL + ['-H', 'Expect:', '-o', '/dev/null', '-T', big,
                   job_url(bench.server.cgi_url, 'big.sh', (bench.size, 0, 0))]
    ours, theirs = [], []
    for _ in range(bench.plan['transfer']):
        proxy.plan(conftest.FaultPlan(),                # the HEAD
                   conftest.FaultPlan(request_cut=bench.size // 2))
        settle_disk(bench)
        ended = run_timed(bench, job)[2]
        epochs = read_stage_epochs(bench, ended)
        if epochs is None or proxy.pending():
            raise BenchError('the cut job uploaded no .env record, or the '
                             'cut never happened')
        ours.append(epochs['End'] - epochs['Put'])
        settle_disk(bench)
        theirs.append(run_timed(bench, curl)[0])
    settle_disk(bench)
    put, reference = median(ours), median(theirs)
    bench.set_figure(key, reference / put, 'curl -T %.3f s / PUT stage cut at'
                     ' half and resumed %.3f s (%d bytes)' % (
                         reference, put, bench.size))


###############################################################################
# Measurements: server ########################################################
###############################################################################

def measure_serve_rps(bench, key):
    """GETs/s from ab: nph_webjob.py serve / a bare http.server."""
    tiny = os.path.join(commands_dir(bench), 'tiny.sh')
    ours = job_url(bench.server.cgi_url, 'tiny.sh')
    base = job_url(start_baseline(bench, tiny), 'tiny.sh')
    check_serves(bench, ours, TINY_SCRIPT, 'nph_webjob.py serve')
    check_serves(bench, base, TINY_SCRIPT, 'the http.server reference')
    found = compare_load(bench, [('serve', ours), ('http.server', base)],
                         bench.plan['seconds'])
    bench.set_figure(key, found['serve']['rps'] / found['http.server']['rps'],
                     'nph_webjob.py serve %.0f req/s (p99 %s ms) / http.server'
                     ' %.0f req/s (p99 %s ms), ab -k -c %d' % (
                         found['serve']['rps'], found['serve'].get('p99_ms'),
                         found['http.server']['rps'],
                         found['http.server'].get('p99_ms'), CONNECTIONS))


def measure_cgi_rps(bench, key):
    """GETs/s from ab through Apache (conftest's ApacheServer): the
    install-cgi stub / a trivial Python CGI with the stub's interpreter."""
    if os.geteuid() != 0 or not shutil.which('apache2', path=os.pathsep.join(
            [os.environ.get('PATH', ''), '/usr/sbin'])):
        bench.skip(key, 'needs root and apache2')
        return
    conftest = load_conftest()
    scratch = tempfile.mkdtemp(prefix='bench-apache-', dir=bench.workspace)
    os.chmod(scratch, 0o755)
    apache = conftest.ApacheServer(scratch, bench.server_python)
    bench.cleanups.append(apache.stop)
    stub = os.path.join(apache.top, 'cgi-client', os.path.basename(
        conftest.STUB_CGI_PATH))
    with open(stub, 'rb') as handle:
        shebang = handle.readline()
    program = os.path.join(apache.root, 'profiles', CLIENT_ID, 'commands',
                           'hostname.sh')
    write_file(os.path.join(apache.top, 'cgi-client', 'plain.cgi'),
               shebang + (PLAIN_CGI % program).encode('utf-8'), 0o755)
    site = 'http://%s:%d' % (LOOPBACK, apache.port)
    ours = job_url(site + conftest.STUB_CGI_PATH, 'hostname.sh')
    base = job_url(site + '/cgi-client/plain.cgi', 'hostname.sh')
    auth = '%s:%s' % (CLIENT_ID, PASSWORD)
    for url, what in ((ours, 'the install-cgi stub'), (base, 'plain.cgi')):
        check_serves(bench, url, conftest.CLIENT_PROGRAM, what, auth)
    found = compare_load(bench, [('stub', ours), ('plain', base)],
                         bench.plan['seconds'] + 1, auth)
    bench.set_figure(key, found['stub']['rps'] / found['plain']['rps'],
                     'install-cgi stub %.0f req/s / trivial CGI %.0f req/s, '
                     'Apache prefork + mod_cgi, ab -k -c %d' % (
                         found['stub']['rps'], found['plain']['rps'],
                         CONNECTIONS))


def measure_cgi_import(bench, key, python):
    """What a CGI request pays before its first line of work: the stub's
    `import nph_webjob` (which imports webjob) from byte code, against the
    bare interpreter; the byte code sizes go in the note."""
    lib = os.path.join(bench.workspace, 'cgi-lib')
    os.mkdir(lib)
    sizes = []
    for name in ('nph_webjob.py', 'webjob.py'):
        shutil.copy(os.path.join(HERE, name), lib)
        run_checked(bench, [python, '-m', 'py_compile',
                            os.path.join(lib, name)])
    for name in sorted(os.listdir(os.path.join(lib, '__pycache__'))):
        sizes.append('%s %d KiB' % (name.split('.')[0], os.path.getsize(
            os.path.join(lib, '__pycache__', name)) // 1024))
    argv = python_argv(bench, python)
    timed = time_commands(bench, [('bare', argv + ['-c', 'pass']), (
        'import', argv + ['-c', 'import sys; sys.path.insert(0, %r); '
                          'import nph_webjob' % lib])])
    set_time_ratio(bench, key, timed, 'import', 'bare', 'import nph_webjob '
                   'from byte code %%.1f ms / python -c pass %%.1f ms (%s)'
                   % ', '.join(sizes))


def start_queue_server(bench, name):
    """A fresh nph_webjob.py serve with JobQueueEnable=Y (conftest's
    launcher) on its own BaseDirectory."""
    conftest = load_conftest()
    work = os.path.join(bench.workspace, name)
    os.mkdir(work)
    config = write_file(os.path.join(work, 'queue.cfg'), b'JobQueueEnable=Y\n')
    server = conftest.start_standalone(work, bench.server_python,
                                       args=['--config', config])
    bench.cleanups.append(lambda: conftest.stop_process(server.proc))
    return server


def start_hunt(bench, server, name, clients):
    """nph_webjob.py hunt start over a group file of clients."""
    group = write_file(os.path.join(bench.workspace, name + '.group'),
                       ('\n'.join(clients) + '\n').encode('ascii'))
    run_checked(bench, python_argv(bench, bench.server_python) + [
        NPH_WEBJOB, 'hunt', 'start', name, '--command', 'common.sh',
        '--group', group, '--root', server.root], 'hunt start')


def measure_job_request(bench, key):
    """Median ms of a JOB request that hands an entry out (lock, settle,
    write the entry whole with fsync, answer), over one keep-alive
    connection, one entry per client."""
    import http.client
    server = start_queue_server(bench, 'jobs')
    clients = ['bench_%04d' % n for n in range(bench.plan['jobs'])]
    start_hunt(bench, server, 'jobs', clients)
    conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=60)
    times = []
    try:
        for client in clients:
            url = job_url(server.cgi_url, 'default').replace(
                'CLIENTID=' + CLIENT_ID, 'CLIENTID=' + client)
            started = time.monotonic()
            conn.request('JOB', url[url.index('/', 8):], headers={
                'Content-Length': '0'})
            reply = conn.getresponse()
            reply.read()
            times.append(time.monotonic() - started)
            if reply.status != 200:
                raise BenchError('JOB for %s answered %d' % (client,
                                                             reply.status))
    finally:
        conn.close()
    bench.set_figure(key, median(times) * 1000, 'median of %d JOB requests '
                     'that each hand out an entry, keep-alive, one client at '
                     'a time' % len(times))


def measure_hunt(bench, key):
    """Seconds from 'hunt start' over HUNT_CLIENTS clients until every
    entry is done: real webjob.py --job processes (full plan) or simulated
    clients (--quick: conftest's JOB/GET/PUT threads), CONNECTIONS at once."""
    conftest = load_conftest()
    server = start_queue_server(bench, 'hunt')
    clients = ['host_%03d' % n for n in range(HUNT_CLIENTS)]
    real = bench.plan['real_clients']
    configs = [write_hunt_config(bench, server, client) for client in clients
               ] if real else []
    started = time.monotonic()
    start_hunt(bench, server, 'sweep', clients)
    if real:
        run_in_parallel(bench, [[bench.python] + bench.flags + [
            WEBJOB, '--job', '-f', config] for config in configs])
    else:
        conftest.run_simulated_clients(server.port, clients, CONNECTIONS)
    status = run_checked(bench, python_argv(bench, bench.server_python) + [
        NPH_WEBJOB, 'hunt', 'status', 'sweep', '--root', server.root],
        'hunt status: not every client is done')
    elapsed = time.monotonic() - started
    bench.set_figure(key, elapsed, '%s; %d %s clients, %d at once' % (
        status.splitlines()[-1], HUNT_CLIENTS, 'webjob.py --job' if real else
        'simulated', CONNECTIONS))


def write_hunt_config(bench, server, client):
    """A client's config and TempDirectory for the hunt."""
    folder = os.path.join(bench.workspace, 'hunt-clients', client)
    os.makedirs(folder)
    return write_file(os.path.join(folder, 'webjob.cfg'), (
        'ClientId=%s\nURLGetURL=%s\nURLPutURL=%s\nTempDirectory=%s\n' % (
            client, server.cgi_url, server.cgi_url, folder)).encode('ascii'))


def run_in_parallel(bench, commands):
    """Run commands CONNECTIONS at a time; BenchError when one fails."""
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < CONNECTIONS:
            running.append(subprocess.Popen(
                pending.pop(), env=bench.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        proc = running.pop(0)
        if proc.wait(timeout=COMMAND_TIMEOUT) != 0:
            raise BenchError('webjob.py --job exited %d' % proc.returncode)


def percentile(values, fraction):
    """The value below which fraction of the sorted values lie."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_fleet_load(bench, port, count, **target):
    """count simulated clients at once (conftest.simulate_fleet: GET then
    PUT each); (jobs/s, p99 job seconds).  Every PUT must be 200."""
    conftest = load_conftest()
    started = time.monotonic()
    outcomes = conftest.simulate_fleet(port, count, **target)
    elapsed = time.monotonic() - started
    failed = [outcome for outcome, seconds in outcomes if outcome != 200]
    if failed:
        raise BenchError('%d of %d simulated jobs failed, e.g. %s' % (
            len(failed), count, failed[0]))
    return count / elapsed, percentile([s for o, s in outcomes], 0.99)


def set_load_figures(bench, front, rate, p99, how):
    bench.set_figure('load_%s_jobs_s' % front, rate, '%d jobs (GET then PUT) '
                     'started at once, %s' % (bench.plan['jobs'], how))
    bench.set_figure('load_%s_p99_ms' % front, p99 * 1000, 'p99 of the jobs '
                     'above, GET to the PUT\'s answer')


def measure_load_standalone(bench, key):
    """Jobs/s and p99 at plan['jobs'] concurrent jobs, then a longer wave
    (plan['wave']) for jobs per hour and the server's peak RSS (VmHWM)."""
    conftest = load_conftest()
    work = os.path.join(bench.workspace, 'load')
    os.mkdir(work)
    server = conftest.start_standalone(work, bench.server_python,
                                       args=['--server-id', 'bench_load'])
    bench.cleanups.append(lambda: conftest.stop_process(server.proc))
    conftest.install_fleet_program(server.root)
    rate, p99 = run_fleet_load(bench, server.port, bench.plan['jobs'])
    set_load_figures(bench, 'standalone', rate, p99, 'nph_webjob.py serve')
    wave = bench.plan['wave']
    rate, p99 = run_fleet_load(bench, server.port, wave)
    bench.set_figure('jobs_per_hour', rate * 3600, '%d simulated jobs at '
                     'once against serve: %.0f jobs/s, p99 %.0f ms' % (
                         wave, rate, p99 * 1000))
    with open('/proc/%d/status' % server.proc.pid) as status:
        peak = [line.split()[1] for line in status if line.startswith(
            'VmHWM:')][0]
    bench.set_figure('server_peak_rss_mb', int(peak) / 1024.0, 'serve\'s '
                     'VmHWM after %d + %d jobs at once, MiB' % (
                         bench.plan['jobs'], wave))


def start_web_server(bench, key, what, *programs):
    """conftest's ApacheServer or NginxServer, or None (skipped) without
    root or the programs."""
    if os.geteuid() != 0 or not all(shutil.which(name, path=os.pathsep.join(
            [os.environ.get('PATH', ''), '/usr/sbin'])) for name in programs):
        bench.skip(key, 'needs root and %s' % ', '.join(programs))
        return None
    conftest = load_conftest()
    scratch = tempfile.mkdtemp(prefix='bench-%s-' % what, dir=bench.workspace)
    os.chmod(scratch, 0o755)
    if what == 'apache':
        server = conftest.ApacheServer(scratch, bench.server_python)
    else:
        os.mkdir(os.path.join(scratch, 'pki'))
        pki = conftest.PKI(os.path.join(scratch, 'pki'))
        server = conftest.NginxServer(scratch, bench.server_python, pki)
        server.pki = pki
    bench.cleanups.append(server.stop)
    conftest.install_fleet_program(server.root)
    return server


def measure_load_apache(bench, key):
    """As measure_load_standalone, through Apache (the install-cgi stub,
    Basic auth, plain port)."""
    apache = start_web_server(bench, key, 'apache', 'apache2')
    if apache is not None:
        conftest = load_conftest()
        rate, p99 = run_fleet_load(bench, apache.port, bench.plan['jobs'],
                                   path=conftest.STUB_CGI_PATH,
                                   auth='%s:%s' % (CLIENT_ID, PASSWORD))
        set_load_figures(bench, 'apache', rate, p99, 'Apache prefork + '
                         'mod_cgi, install-cgi stub, Basic auth')


def measure_load_nginx(bench, key):
    """As measure_load_standalone, through nginx + fcgiwrap as the README
    configures them (TLS, client certificate, Basic auth, the install-cgi
    stub under the parsed-header name)."""
    import ssl
    nginx = start_web_server(bench, key, 'nginx', 'nginx', 'fcgiwrap')
    if nginx is not None:
        conftest = load_conftest()
        context = ssl.create_default_context(cafile=nginx.pki.path('ca.crt'))
        context.load_cert_chain(nginx.pki.path('client.crt'),
                                nginx.pki.path('client.key'))
        rate, p99 = run_fleet_load(bench, nginx.port, bench.plan['jobs'],
                                   path=conftest.PARSED_STUB_CGI_PATH,
                                   context=context,
                                   auth='%s:%s' % (CLIENT_ID, PASSWORD))
        set_load_figures(bench, 'nginx', rate, p99, 'nginx + fcgiwrap, '
                         'install-cgi stub, TLS with a client certificate, '
                         'Basic auth')


# The WebDAV reference: nginx's own PUT into a folder.
DAV_CONF = '''\
user root root;
worker_processes 1;
daemon off;
pid {top}/nginx.pid;
error_log {top}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {top}/body;
    server {{
        listen 127.0.0.1:{port};
        location /up/ {{
            root {top};
            dav_methods PUT;
            client_max_body_size 0;
        }}
    }}
}}
'''


def start_dav(bench):
    """nginx with dav_methods PUT on a free port; the upload URL's base."""
    conftest = load_conftest()
    top = tempfile.mkdtemp(prefix='bench-dav-', dir=bench.workspace)
    for sub in ('body', 'up'):
        os.mkdir(os.path.join(top, sub))
    port = conftest.free_port()
    conf = write_file(os.path.join(top, 'nginx.conf'), DAV_CONF.format(
        top=top, port=port).encode('ascii'))
    proc = subprocess.Popen(['nginx', '-c', conf, '-p', top + '/', '-e',
                             os.path.join(top, 'error.log')],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    bench.cleanups.append(lambda: conftest.stop_process(proc))
    conftest.wait_for_port(LOOPBACK, port, proc=proc)
    return 'http://%s:%d/up/' % (LOOPBACK, port), os.path.join(top, 'up')


def measure_small_put_vs_dav(bench, key):
    """PUTs/s of a 4 KiB upload, ab -k -c CONNECTIONS: serve (fsync of each
    file and the folder before the answer) / nginx WebDAV PUT (nginx has
    no fsync: the reference is less durable)."""
    if os.geteuid() != 0 or not shutil.which('nginx', path=os.pathsep.join(
            [os.environ.get('PATH', ''), '/usr/sbin'])):
        bench.skip(key, 'needs root and nginx')
        return
    body = write_file(os.path.join(bench.workspace, 'small-put.bin'),
                      b'x' * SMALL_PUT)
    dav, folder = start_dav(bench)
    ours = job_url(bench.server.cgi_url, 'hostname.sh', (SMALL_PUT, 0, 0))
    runs = {'serve': [], 'dav': []}
    for _ in range(bench.plan['rounds']):
        for label, url in (('serve', ours), ('dav', dav + 'small.bin')):
            runs[label].append(load_with_ab(bench, url, bench.plan['seconds'],
                                            put=body)['rps'])
        clear_folder(os.path.join(bench.server.root, 'incoming'))
    serve, reference = median(runs['serve']), median(runs['dav'])
    bench.set_figure(key, serve / reference, 'serve %.0f PUT/s (fsync) / '
                     'nginx WebDAV %.0f PUT/s (no fsync), 4 KiB, ab -k -c %d'
                     % (serve, reference, CONNECTIONS))


def measure_large_put_vs_dav(bench, key):
    """Seconds to store a LARGE_PUT upload: curl -T into nginx WebDAV then
    sync(1) of the file (the same durability) / curl -T into serve (which
    hashes, writes and fsyncs before its answer)."""
    if os.geteuid() != 0 or not shutil.which('nginx', path=os.pathsep.join(
            [os.environ.get('PATH', ''), '/usr/sbin'])):
        bench.skip(key, 'needs root and nginx')
        return
    size = LARGE_PUT if bench.plan is PLANS['full'] else bench.size
    sparse = os.path.join(bench.workspace, 'large-put.bin')
    with open(sparse, 'wb') as handle:
        handle.truncate(size)
    dav, folder = start_dav(bench)
    ours = job_url(bench.server.cgi_url, 'hostname.sh', (size, 0, 0))
    stored = os.path.join(folder, 'large.bin')
    commands = [('serve', CURL + ['-o', '/dev/null', '-H', 'Expect:', '-T',
                                  sparse, ours]),
                ('dav', ['sh', '-c', '"$@" && sync "%s"' % stored, 'put'] +
                 CURL + ['-o', '/dev/null', '-H', 'Expect:', '-T', sparse,
                         dav + 'large.bin'])]
    times = {'serve': [], 'dav': []}
    for _ in range(bench.plan['rounds']):
        for label, argv in commands:
            settle_disk(bench)
            times[label].append(run_timed(bench, argv)[0])
            clear_folder(os.path.join(bench.server.root, 'incoming'))
            clear_folder(folder)
    serve, reference = median(times['serve']), median(times['dav'])
    bench.set_figure(key, reference / serve, 'nginx WebDAV + sync %.2f s / '
                     'serve %.2f s for %d bytes (curl -T, %.0f / %.0f MB/s)' % (
                         reference, serve, size, size / reference / 1e6,
                         size / serve / 1e6))


#: What runs, in order: (--json key, function, interpreter or None).  A
#: function sets its key with bench.set_figure (or bench.set_split).
MEASUREMENTS = (
    ('startup_vs_bare', measure_startup, 'default'),
    ('startup_vs_bare_py36', measure_startup, PY36),
    ('tiny_job_ratio', measure_tiny_job, 'default'),
    ('tiny_job_ratio_py36', measure_tiny_job, PY36),
    ('tiny_job_split_ms', measure_tiny_job_split, 'default'),
    ('tiny_job_split_ms_py36', measure_tiny_job_split, PY36),
    ('serve_rps_ratio', measure_serve_rps, None),
    ('cgi_rps_ratio', measure_cgi_rps, None),
    ('cgi_import_vs_bare', measure_cgi_import, 'default'),
    ('get_ratio', measure_get, None),
    ('capture_ratio', measure_capture_and_put, None),
    ('rss_large_mb', measure_rss, None),
    ('tls_put_ratio', measure_tls_put, None),
    ('retry_cycle_ms', measure_retry_cycle, None),
    ('job_request_ms', measure_job_request, None),
    ('hunt_300_s', measure_hunt, None),
    ('stream_disk_peak_mib', measure_stream, None),
    ('resume_ratio', measure_resume, None),
    ('load_standalone_jobs_s', measure_load_standalone, None),
    ('load_apache_jobs_s', measure_load_apache, None),
    ('load_nginx_jobs_s', measure_load_nginx, None),
    ('small_put_vs_dav', measure_small_put_vs_dav, None),
    ('large_put_vs_dav', measure_large_put_vs_dav, None),
)


###############################################################################
# Orchestration and report ####################################################
###############################################################################

class Bench(object):
    """Settings, results and everything to clean up."""

    def __init__(self, args):
        self.plan = PLANS['quick' if args.quick else 'full']
        self.size = args.size or self.plan['size']
        self.python = args.python
        self.server_python = args.server_python or args.python
        self.flags = ['-I'] if args.site else ['-I', '-S']
        self.env = build_environment()
        self.figures, self.notes, self.errors, self.skipped = {}, {}, {}, {}
        self.splits = {}
        self.versions = {}
        self.cleanups = []
        self.workspace = tempfile.mkdtemp(prefix='bench_webjob.')
        os.chmod(self.workspace, 0o755)
        self.cleanups.append(lambda: shutil.rmtree(self.workspace, True))
        self.client_dir = os.path.join(self.workspace, 'client')
        self.work_dir = os.path.join(self.workspace, 'work')
        for folder in (self.client_dir, self.work_dir,
                       os.path.join(self.workspace, 'serve')):
            os.mkdir(folder)
        self.server = None
        self.configs = {}

    def set_figure(self, key, value, note):
        self.figures[key] = round(value, 3)
        self.notes[key] = note

    def set_split(self, key, rows):
        self.splits[key] = rows

    def skip(self, key, reason):
        self.skipped[key] = reason
        log_progress('%s skipped: %s' % (key, reason))

    def attempt(self, key, function, python):
        """Run one measurement; a failure is recorded, not raised."""
        if python is not None:
            python = self.python if python == 'default' else python
            if python not in self.versions:
                self.versions[python] = probe_version(self, python)
            if self.versions[python] is None:
                self.skip(key, '%s does not run' % python)
                return
        log_progress('measuring %s' % key)
        try:
            if self.server is None:
                raise BenchError('the standalone server did not start')
            function(self, key, *([python] if python else []))
        except (BenchError, OSError, RuntimeError, ValueError, KeyError,
                subprocess.SubprocessError) as exc:
            self.errors[key] = '%s: %s' % (type(exc).__name__, exc)
            log_progress('%s failed: %s' % (key, self.errors[key]))

    def clean_up(self):
        while self.cleanups:
            try:
                self.cleanups.pop()()
            except Exception as exc:  # keep cleaning up
                log_progress('cleanup: %s: %s' % (type(exc).__name__, exc))


def judge(bench, key, op, bound):
    """'ok', 'MISS', 'skip', 'ERROR' or '' (no goal)."""
    if key in bench.skipped:
        return 'skip'
    if key in bench.errors:
        return 'ERROR'
    value = bench.figures.get(key)
    if value is None or op is None:
        return ''
    if op == 'delta<':
        value -= bench.figures.get('rss_small_mb', value)
    return 'ok' if (value <= bound if op == '<=' else value >= bound
                    if op == '>=' else value < bound) else 'MISS'


def build_report(bench, load):
    """The --json object: every figure by its key, then the rest."""
    report = dict((key, bench.figures.get(key)) for key, op, bound in FIGURES)
    report['results'] = dict((key, judge(bench, key, op, bound))
                             for key, op, bound in FIGURES)
    report['goals'] = dict((key, '%s %s' % (op, bound)) for key, op, bound
                           in FIGURES if op)
    report['missed'] = sorted(key for key, result in report['results']
                              .items() if result == 'MISS')
    report.update(bench.splits)
    report.update({'notes': bench.notes, 'errors': bench.errors,
                   'skipped': bench.skipped, 'meta': {
                       'python': bench.python, 'flags': ' '.join(bench.flags),
                       'versions': bench.versions, 'size': bench.size,
                       'plan': bench.plan, 'cpus': os.cpu_count(),
                       'load_average_before': load}})
    return report


def format_table(bench, report):
    lines = ['webjob.py benchmark: %s %s, payload %d bytes, %s CPUs, load '
             'average %.2f before; medians' % (
                 bench.python, ' '.join(bench.flags), bench.size,
                 os.cpu_count(), report['meta']['load_average_before']), '',
             '%-22s %8s  %-8s %-6s %s' % ('figure', 'value', 'goal', 'result',
                                          'measured'), '-' * 100]
    for key, op, bound in FIGURES:
        value = report[key]
        lines.append('%-22s %8s  %-8s %-6s %s' % (
            key, '-' if value is None else '%.2f' % value,
            report['goals'].get(key, '-'), report['results'][key],
            bench.notes.get(key) or bench.errors.get(key) or
            bench.skipped.get(key) or ''))
    for key, rows in sorted(bench.splits.items()):
        lines += ['', '%s:' % key]
        lines += ['  %-44s' % row[0] + ''.join('%9s' % (
            '%.2f' % cell if isinstance(cell, float) else cell)
            for cell in row[1:]) for row in rows]
    if report['missed']:
        lines.append('\ngoals missed: ' + ', '.join(report['missed']))
    return '\n'.join(lines) + '\n'


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='bench_webjob.py',
        description='Benchmark webjob.py and nph_webjob.py on loopback.')
    parser.add_argument('--json', action='store_true',
                        help='print one JSON object instead of the table')
    parser.add_argument('--quick', action='store_true',
                        help='small sizes, few repetitions (CI smoke test)')
    parser.add_argument('--size', type=int, metavar='BYTES',
                        help='large transfer size (default 1 GiB, 8 MiB '
                             'with --quick)')
    parser.add_argument('--python', default=sys.executable, metavar='PATH',
                        help='interpreter that runs webjob.py')
    parser.add_argument('--server-python', metavar='PATH',
                        help='interpreter that runs the servers')
    parser.add_argument('--site', action='store_true',
                        help='run interpreters with -I only, not -I -S')
    parser.add_argument('--only', metavar='KEY,...',
                        help='run only these MEASUREMENTS keys')
    args = parser.parse_args(argv)
    if args.size is not None and args.size < 2 * MIB:
        parser.error('--size must be at least %d bytes' % (2 * MIB))
    known = [key for key, function, python in MEASUREMENTS]
    args.only = args.only.split(',') if args.only else known
    if set(args.only) - set(known):
        parser.error('--only: unknown key(s) %s; known: %s' % (
            ', '.join(sorted(set(args.only) - set(known))), ', '.join(known)))
    return args


def raise_interrupt(signal_number, frame):
    raise KeyboardInterrupt


def main(argv=None):
    """Run every measurement, print the table or JSON; 1 if one failed."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for tool in ('hyperfine', 'ab', 'curl'):
        if shutil.which(tool) is None:
            sys.stderr.write('bench_webjob.py: %s is not installed (apt-get '
                             'install hyperfine apache2-utils curl)\n' % tool)
            return 1
    load = round(os.getloadavg()[0], 2)
    signal.signal(signal.SIGTERM, raise_interrupt)
    bench = Bench(args)
    try:
        try:
            start_servers(bench)
        except (BenchError, OSError, RuntimeError) as exc:
            log_progress('standalone server: %s' % exc)
        for key, function, python in MEASUREMENTS:
            if key in args.only:
                bench.attempt(key, function, python)
    except KeyboardInterrupt:
        log_progress('interrupted; cleaning up')
        return 130
    finally:
        bench.clean_up()
    report = build_report(bench, load)
    table = format_table(bench, report)
    if args.json:   # stdout stays one JSON object; the table goes to stderr
        sys.stderr.write(table)
        sys.stdout.write(json.dumps(report, indent=1, sort_keys=True) + '\n')
    else:
        sys.stdout.write(table)
    return 1 if bench.errors else 0


if __name__ == '__main__':
    sys.exit(main())
