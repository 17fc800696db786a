"""Process supervision's start: spawn() (issue 14).

A job starts its program with os.posix_spawn (Python 3.8 and newer) or
fork and exec (3.6, 3.7), not subprocess, whose import (with signal,
threading, enum, re and locale) cost more than a tiny job's own work.  The
program gets what subprocess gave it: its own session, the streams asked
for and nothing else this process holds, SIGPIPE at its default, a script
without #! run by /bin/sh, an OSError when it cannot start.  Each behaviour
is checked on the default interpreter and on 3.6 and 3.7 (the fork path),
by a driver that imports webjob.py from this folder.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from test_client import WEBJOB, basic_cfg, job_dir, scripted  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
PYENV = '/root/.pyenv/versions'
INTERPRETERS = [sys.executable] + sorted(
    os.path.join(PYENV, name, 'bin', 'python') for name in os.listdir(PYENV)
    if name.startswith(('3.6.', '3.7.'))) if os.path.isdir(PYENV) else [
        sys.executable]

# Runs one spawn() and prints what the program said and how it ended.
DRIVER = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import webjob
argv, options, inherited = json.loads(sys.argv[2])
for name in ('stdin', 'stdout', 'stderr'):
    if options.get(name) == 'PIPE':
        options[name] = webjob.PIPE
    elif options.get(name) == 'DEVNULL':
        options[name] = webjob.DEVNULL
    elif isinstance(options.get(name), str):
        options[name] = open(options[name], 'rb' if name == 'stdin' else 'wb')
if inherited:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(fd, True)
    argv = [part.replace('FD', str(fd)) for part in argv]
try:
    proc = webjob.spawn(argv, **options)
except OSError as exc:
    try:
        child = os.waitpid(-1, os.WNOHANG) is not None
    except ChildProcessError:
        child = False
    print(json.dumps({'errno': exc.errno, 'child': child,
                      'threads': len(os.listdir('/proc/self/task')),
                      'fds': len(os.listdir('/proc/self/fd'))}))
    sys.exit(0)
out = proc.stdout.read().decode() if proc.stdout is not None else None
print(json.dumps({'pid': proc.pid, 'out': out, 'status': proc.wait()}))
'''


def run_spawn(python, argv, inherited=False, **options):
    result = subprocess.run(
        [python, '-I', '-S', '-c', DRIVER, HERE,
         json.dumps([argv, options, inherited])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b''
    return json.loads(result.stdout.decode())


@pytest.fixture(params=INTERPRETERS, ids=os.path.basename)
def python(request):
    path = request.param
    if path != sys.executable:
        version = subprocess.run([path, '-c', 'import os; print(hasattr(os, '
                                  '"posix_spawn"))'], stdout=subprocess.PIPE,
                                 check=True).stdout
        assert version == b'False\n', 'expected a Python without posix_spawn'
    return path


def test_the_program_leads_its_own_session_and_group(python):
    said = run_spawn(python, ['/bin/sh', '-c', 'cut -d" " -f1,5,6 /proc/$$/stat'],
                     stdout='PIPE')
    pid, group, session = said['out'].split()
    assert int(pid) == said['pid'] == int(group) == int(session)


def test_the_program_gets_the_streams_asked_for(python, tmp_path):
    source = tmp_path / 'in.txt'
    source.write_bytes(b'evidence in\n')
    errors = tmp_path / 'err.txt'
    said = run_spawn(python, ['/bin/sh', '-c', 'cat; echo oops >&2'],
                     stdin=str(source), stdout='PIPE', stderr=str(errors))
    assert said['out'] == 'evidence in\n'
    assert errors.read_bytes() == b'oops\n'


def test_a_devnull_stream_reads_nothing(python):
    said = run_spawn(python, ['/bin/sh', '-c', 'wc -c'], stdin='DEVNULL',
                     stdout='PIPE')
    assert said['out'].strip() == '0'


def test_an_inherited_descriptor_does_not_reach_the_program(python):
    said = run_spawn(python, ['/bin/sh', '-c', 'test -e /proc/$$/fd/FD && '
                              'echo open || echo closed'], inherited=True,
                     stdout='PIPE')
    assert said['out'] == 'closed\n'


def test_sigpipe_is_at_its_default_in_the_program(python):
    said = run_spawn(python, ['/bin/sh', '-c', 'grep SigIgn /proc/$$/status'],
                     stdout='PIPE')
    ignored = int(said['out'].split()[1], 16)
    assert not ignored & (1 << (13 - 1))


def test_a_script_without_a_shebang_is_run_by_sh(python, tmp_path):
    script = tmp_path / 'plain.sh'
    script.write_bytes(b'echo "run by sh: $0"\n')
    script.chmod(0o755)
    said = run_spawn(python, [str(script)], stdout='PIPE')
    assert said['out'] == 'run by sh: %s\n' % script


def test_a_program_that_cannot_start_raises_and_leaves_nothing(python,
                                                               tmp_path):
    said = run_spawn(python, [str(tmp_path / 'missing')])
    assert said['errno'] == 2
    assert not said['child'] and said['threads'] == 1
    assert said['fds'] == 4                 # 0, 1, 2 and the listing's own


def test_cwd_is_the_program_s_folder(python, tmp_path):
    said = run_spawn(python, ['/bin/sh', '-c', 'pwd -P'], cwd=str(tmp_path),
                     stdout='PIPE')
    assert said['out'] == os.path.realpath(str(tmp_path)) + '\n'


@pytest.mark.parametrize('command, status', [('exit 3', 3),
                                             ('kill -9 $$', -9)])
def test_the_status_is_the_exit_code_or_the_negative_signal(python, command,
                                                            status):
    said = run_spawn(python, ['/bin/sh', '-c', command])
    assert said['status'] == status


def test_a_job_imports_no_python_wrapper_of_a_c_module(python, tmp_path,
                                                       scripted, job_dir):
    """signal, socket, threading and subprocess pull in enum, functools,
    collections, re and locale: 20-40 ms of a tiny job."""
    cfg = basic_cfg(tmp_path, scripted, job_dir)
    result = subprocess.run([python, '-I', '-S', '-v', WEBJOB, '-e', '-f', cfg,
                             'job.sh'], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    imported = set(re.findall(r"^import '([\w.]+)'", result.stderr.decode(),
                              re.M))
    assert {'_socket', 'hashlib'} <= imported
    assert imported & {'signal', 'socket', 'threading', 'subprocess', 'enum',
                       're', 'locale', 'functools', 'collections'} == set()
