"""Nothing keeps running unsupervised (issue 12).

A stop signal during any stage ends the program's (or GetHook's) whole
process group, removes what Unlink* says, records the reason in the kept
.env, says where the outputs are, and exits 1 (XER_Abort).  Background
children of a program that exits first are killed with its group; a
child that leaves the group with setsid escapes, as the README says.
"""

import os
import signal
import subprocess
import sys
import threading

import pytest

import webjob
from conftest import wait_for_lines
from test_client import (WEBJOB, basic_cfg, job_dir, output_files,
                         process_gone, scripted, wait_until)

# Writes the pid of a background child, then its own, then waits.
STUBBORN = b'''#!/bin/sh
here=$(dirname "$0")
sleep 300 &
echo $! > "$here/bg.pid"
echo $$ > "$here/kid.tmp"; mv "$here/kid.tmp" "$here/kid.pid"
wait
'''


def start_webjob(cfg, program='job.sh', preexec_fn=None):
    env = dict(os.environ)
    env.pop('WEBJOB_DEBUG', None)
    return subprocess.Popen([sys.executable, WEBJOB, '-e', '-f', cfg, program],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, preexec_fn=preexec_fn)


def read_pid(path):
    lines = wait_for_lines(path, 1, timeout=120)
    assert lines, 'the program never wrote %s' % path
    return int(lines[0])


def finish(proc):
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err.decode()


def assert_stopped_cleanly(code, err, name, stage):
    assert code == webjob.XER_ABORT, err
    assert err.count('\n') == 1 and err.startswith('webjob: '), err
    assert 'Traceback' not in err
    assert '%s: interrupted by %s' % (stage, name) in err, err


@pytest.mark.parametrize('name', ['SIGTERM', 'SIGHUP', 'SIGINT', 'SIGQUIT',
                                  'SIGUSR1'])
def test_stop_signal_during_run_ends_the_group_and_keeps_a_record(
        tmp_path, scripted, job_dir, name):
    scripted.program = STUBBORN
    cfg = basic_cfg(tmp_path, scripted, job_dir, UnlinkExecutable='Y')
    proc = start_webjob(cfg)
    kid = read_pid(job_dir / 'kid.pid')
    background = read_pid(job_dir / 'bg.pid')
    proc.send_signal(getattr(signal, name))
    code, out, err = finish(proc)
    assert_stopped_cleanly(code, err, name, 'RunStage')
    assert wait_until(lambda: process_gone(kid) and process_gone(background),
                      timeout=60)
    assert not (job_dir / 'job.sh').exists()          # UnlinkExecutable=Y
    assert 'the output files are kept in %s' % job_dir in err
    env = (job_dir / output_files(job_dir, 'env')[0]).read_text()
    assert 'RunError=interrupted by %s during RunStage' % name in env
    assert ('KidReason=The kid was killed (%s to its process group) when '
            'webjob was interrupted.' % name) in env
    assert [r.method for r in scripted.requests] == ['GET']


def held_server(server, method):
    """Hold the answer to method until released; .arrived is set first."""
    server.arrived = threading.Event()
    server.release = threading.Event()
    answer = server.respond

    def respond(request):
        if request.method == method:
            server.arrived.set()
            server.release.wait(120)
            return None
        return answer(request)
    server.respond = respond


def test_stop_signal_during_get_hook_ends_it_and_removes_its_output(
        tmp_path, scripted, job_dir):
    cfg = basic_cfg(tmp_path, scripted, job_dir, GetHookEnable='Y',
                    GetHookSuffix='.gpg', GetHookStatus='0',
                    GetHookCommandLine='cp %vp %tp; echo $$ > hook.tmp; '
                    'mv hook.tmp hook.pid; exec sleep 300')
    proc = start_webjob(cfg)
    hook = read_pid(job_dir / 'hook.pid')
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert_stopped_cleanly(code, err, 'SIGTERM', 'GetStage')
    assert wait_until(lambda: process_gone(hook), timeout=60)
    left = os.listdir(str(job_dir))
    assert 'job.sh' not in left and 'job.sh.gpg' not in left, left


@pytest.mark.parametrize('method, stage', [('GET', 'GetStage'),
                                           ('PUT', 'PutStage')])
def test_stop_signal_during_a_transfer_keeps_whole_outputs_only(
        tmp_path, scripted, job_dir, method, stage):
    held_server(scripted, method)
    proc = start_webjob(basic_cfg(tmp_path, scripted, job_dir))
    try:
        assert scripted.arrived.wait(120)
        proc.send_signal(signal.SIGTERM)
        code, out, err = finish(proc)
    finally:
        scripted.release.set()
    assert_stopped_cleanly(code, err, 'SIGTERM', stage)
    assert 'the output files are kept in %s' % job_dir in err
    left = os.listdir(str(job_dir))      # no partial download
    # A stop during the PUT leaves the group unconfirmed: its .kept marker
    # stays, so that --resend sends it (README, Delivery).
    assert sorted(p.rsplit('.', 1)[1] for p in left if
                  p.startswith('webjob_')) == (
        ['env', 'err', 'kept', 'out'] if method == 'PUT' else
        ['env', 'err', 'out']), left
    if method == 'GET':
        env = (job_dir / output_files(job_dir, 'env')[0]).read_text()
        assert 'GetError=interrupted by SIGTERM during GetStage' in env


def test_inherited_ignored_sighup_stays_ignored(tmp_path, scripted, job_dir):
    # nohup webjob ...: SIGHUP was ignored before we started; keep it so.
    scripted.program = (b'#!/bin/sh\necho $$ > "$(dirname "$0")/kid.tmp"; '
                      b'mv "$(dirname "$0")/kid.tmp" "$(dirname "$0")/kid.pid"'
                      b'\nwhile [ ! -e "$(dirname "$0")/go" ]; do sleep 0.05; '
                      b'done\necho done\n')
    proc = start_webjob(basic_cfg(tmp_path, scripted, job_dir, put=False),
                        preexec_fn=lambda: signal.signal(signal.SIGHUP,
                                                         signal.SIG_IGN))
    read_pid(job_dir / 'kid.pid')
    proc.send_signal(signal.SIGHUP)
    (job_dir / 'go').write_text('')
    code, out, err = finish(proc)
    assert code == 0, err
    assert out == b'done\n'


def test_signal_between_spawn_and_wait_still_ends_the_child(tmp_path):
    # The signal is sent the instant spawn() returns, before the wait.
    seen = []

    def started(proc):
        seen.append(proc)
        os.kill(os.getpid(), signal.SIGINT)

    webjob.SIGNALS.install()
    try:
        with pytest.raises(webjob.Interrupted) as caught:
            webjob.supervise(['/bin/sh', '-c', 'exec sleep 300'], 0, 9, started)
    finally:
        webjob.SIGNALS.restore()
    assert caught.value.signal_number == signal.SIGINT
    proc, = seen
    assert proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_background_children_are_killed_when_the_program_exits(tmp_path,
                                                               scripted, job_dir):
    scripted.program = (b'#!/bin/sh\nsleep 300 &\necho $! > "$(dirname "$0")'
                      b'/bg.pid"\necho started\n')
    cfg = basic_cfg(tmp_path, scripted, job_dir, put=False)
    proc = start_webjob(cfg)
    code, out, err = finish(proc)
    assert code == 0, err
    assert out == b'started\n'
    background = read_pid(job_dir / 'bg.pid')
    assert wait_until(lambda: process_gone(background), timeout=60)


def test_a_child_that_leaves_with_setsid_escapes(tmp_path, scripted, job_dir):
    # What the README says the client cannot do: a new session is no
    # longer the program's process group, and nothing follows it there.
    scripted.program = (b'#!/bin/sh\ncd "$(dirname "$0")"\nsetsid sh -c '
                      b'\'echo $$ > esc.tmp; mv esc.tmp esc.pid; exec sleep '
                      b'300\' > /dev/null 2>&1 &\nwhile [ ! -e esc.pid ]; do sleep 0.05; done\n')
    proc = start_webjob(basic_cfg(tmp_path, scripted, job_dir, put=False))
    escaped = read_pid(job_dir / 'esc.pid')
    try:
        code, out, err = finish(proc)
        assert code == 0, err
        assert not process_gone(escaped)
    finally:
        os.kill(escaped, signal.SIGKILL)
