"""The trigger supervisor runs the trigger with the client's own process
supervision (webjob.spawn, webjob.wait_with_deadline): one implementation
of starting, timing and killing a process group for both programs.  The
trigger tests of test_server.py pin the log lines and the time limit; these
pin what the shared supervision must keep for a trigger.
"""

import ast
import os
import signal

import nph_webjob
from conftest import HERE, write_file
from test_server import Front, TRIGGER_LINE, live_group_members


def start_front(tmp_path, standalone_server, controls):
    cfg = write_file(tmp_path / 'nph-webjob.cfg', ''.join(
        '%s = %s\n' % item for item in controls).encode())
    server = standalone_server(args=['--config', str(cfg)])
    return Front('standalone', server.port, server.root, str(tmp_path),
                 str(tmp_path))


def test_what_a_trigger_leaves_in_the_background_keeps_running(
        tmp_path, standalone_server):
    """The trigger exits at once; the job it started in the background (a
    compression, a copy) is its business and is not killed with it."""
    front = start_front(tmp_path, standalone_server, [
        ('PutTriggerEnable', 'Y'),
        ('PutTriggerCommandLine', 'sleep 600 </dev/null >/dev/null 2>&1 & '
         'echo $! > %s/background.tmp && mv %s/background.tmp %s/background'
         % ((str(tmp_path),) * 3))])
    assert front.put().status == 200
    start, end = [TRIGGER_LINE.match(line) for line in front.trigger_lines(2)]
    assert end.group('state', 'message') == ('finished', 'Exit status (0)')
    pid = int((tmp_path / 'background').read_text())
    group = int(start.group('pid'))
    try:
        assert pid in live_group_members(group)
    finally:
        os.killpg(group, signal.SIGKILL)


def test_the_supervisor_starts_and_times_the_trigger_with_webjob():
    """No fork, exec or alarm of its own: spawn and wait_with_deadline."""
    with open(os.path.join(HERE, 'nph_webjob.py'), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    body = next(node for node in tree.body if isinstance(
        node, ast.FunctionDef) and node.name == 'supervise_trigger')
    called = set('%s.%s' % (node.func.value.id, node.func.attr)
                 for node in ast.walk(body) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Attribute)
                 and isinstance(node.func.value, ast.Name))
    assert {'webjob.spawn', 'webjob.wait_with_deadline'} <= called
    assert called & {'os.fork', 'os.execve', 'os.waitpid', 'signal.alarm',
                     'os.setpgid'} == set()
    assert not hasattr(nph_webjob, 'kill_group')
