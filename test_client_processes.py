"""webjob.py's process supervision: an interrupt never leaves a kid behind
that nobody will kill."""

import os
import signal
import subprocess

import pytest

import webjob


def test_an_interrupt_while_the_kid_starts_is_raised_once_it_is_known(
        monkeypatch):
    """SIGINT inside Popen (the kid already forked) is held: spawn records
    the kid's group for main to kill, and only then raises."""
    started = []
    real = webjob.start_program

    def start_then_interrupt(*args):
        proc = real(*args)
        started.append(proc)
        os.kill(os.getpid(), signal.SIGINT)
        return proc
    monkeypatch.setattr(webjob, 'start_program', start_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            webjob.spawn(['sleep', '300'])
        assert started and started[0].pid in webjob.LIVE_GROUPS
    finally:
        for proc in started:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            webjob.LIVE_GROUPS.discard(proc.pid)


def test_main_kills_the_groups_it_started_when_interrupted(monkeypatch,
                                                           capsys):
    kid = webjob.spawn(['sleep', '300'])

    def interrupted(mode, arguments):
        raise KeyboardInterrupt
    monkeypatch.setattr(webjob, 'dispatch', interrupted)
    try:
        assert webjob.main(['-v']) == 1
        assert kid.wait(timeout=60) == -signal.SIGKILL
        assert 'interrupted' in capsys.readouterr().err
    finally:
        if kid.poll() is None:
            os.killpg(kid.pid, signal.SIGKILL)
            kid.wait()
        webjob.LIVE_GROUPS.discard(kid.pid)


def test_a_reaped_kid_is_forgotten():
    proc = webjob.spawn(['true'])
    assert webjob.wait_with_deadline(proc, 0, signal.SIGTERM) is False
    assert proc.pid not in webjob.LIVE_GROUPS
