"""Job queues, hunts and reports in nph_webjob.py: the JOB request, the
administrator's job/hunt/report commands, entry states and their survival.

Requests run in-process through handle_request (a fake clock where time
matters) or over loopback against 'nph_webjob.py serve'; the commands run
as real subprocesses, as an administrator types them.
"""

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest

import nph_webjob
from conftest import (LOOPBACK, NEWEST_PY, NPH_WEBJOB, OLDEST_PY,
                      write_file)
from conftest import read_queue_entry as entry

VERSION = 'webjob+1.0.0+ssl+dsv+64+bit'
SYSTEM = 'x86_64+Linux+6.18.0-1-amd64'
COLLECT = b'#!/bin/sh\necho "collected $*"\n'


def query(client='client_1', filename='default', lengths=None):
    text = 'VERSION=%s&SYSTEM=%s&CLIENTID=%s&FILENAME=%s&RUNTYPE=snapshot' % (
        VERSION, SYSTEM, client, filename)
    if lengths is not None:
        text += '&STDOUT_LENGTH=%d&STDERR_LENGTH=%d&STDENV_LENGTH=%d' % lengths
    return text


class Clock(object):
    """The site's clock, moved by the test."""

    def __init__(self, now=1800000000.0):
        self.now = now

    def __call__(self):
        return self.now


def make_site(root, clock=None, **values):
    overrides = dict(BaseDirectory=str(root), RequireUser=False,
                     JobQueueEnable=True)
    overrides.update(values)
    counter = iter(range(1, 10 ** 6))
    return nph_webjob.load_site(None, overrides=overrides,
                                next_serial=lambda: next(counter),
                                clock=clock)


def request(site, method, query_string, body=b'', job_id=None):
    """One request through handle_request: (status, Job-Id, body, message)."""
    environ = {'REQUEST_METHOD': method, 'REMOTE_ADDR': '192.0.2.7',
               'QUERY_STRING': query_string,
               'CONTENT_LENGTH': str(len(body))}
    if job_id:
        environ['HTTP_JOB_ID'] = job_id
    exchange = nph_webjob.process_request(environ, io.BytesIO(body), site)
    out = io.BytesIO()
    nph_webjob.send_response(exchange, out)
    nph_webjob.log_exchange(exchange, site)
    data = out.getvalue().split(b'\r\n\r\n', 1)[1]
    return exchange.status, exchange.job_id, data, exchange.message


def ask(site, client='client_1'):
    return request(site, 'JOB', query(client))


def env_record(status=0, get_error='NA', jid='x'):
    return ('Version=webjob 1.0.0\nClientId=client_1\nJid=%s\nKidStatus=%s\n'
            'GetError=%s\nRunError=NA\n' % (jid, status, get_error)).encode()


def upload(site, job_id, client='client_1', status=0, get_error='NA',
           program='collect.sh'):
    out, env = b'collected\n', env_record(status, get_error, job_id)
    return request(site, 'PUT', query(client, program,
                                      (len(out), 0, len(env))),
                   out + env, job_id)


def admin(root, *args):
    """Run 'nph_webjob.py ARGS --root ROOT'; (status, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, NPH_WEBJOB] + list(args) +
                            ['--root', str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def root(server_root):
    write_file(server_root / 'profiles/common/commands/collect.sh', COLLECT,
               0o755)
    for name in ('client_2', 'web_1', 'web_2'):
        os.makedirs(str(server_root / 'profiles' / name))
    return server_root


def queue(root, *args):
    status, out, err = admin(root, 'job', 'add', '--command', 'collect.sh',
                             *args)
    assert status == 0, err
    return [line.split(':')[0] for line in out.splitlines()]


# The JOB request #############################################################

def test_job_request_is_405_while_job_queues_are_off(root):
    queue(root, '--client', 'client_1')
    site = make_site(root, JobQueueEnable=False)
    assert ask(site)[0] == 405
    assert entry(root, 'client_1/000001')['State'] == 'queued'


def test_job_request_hands_out_the_job_file_with_a_job_id(root):
    name, = queue(root, '--client', 'client_1', '--args', '-v  now',
                  '--comment', 'case 42', '--pin')
    status, job_id, body, message = ask(make_site(root))
    assert status == 200 and re.match(r'server_1_\d{10}_\d{5}\Z', job_id)
    digest = nph_webjob.hash_file(str(root / 'profiles/common/commands/'
                                      'collect.sh'), ['SHA256'])['SHA256']
    assert body.decode() == (
        'CommandAlias=collect.sh\nCommandLine=collect.sh -v now\n'
        'CommandSha256=%s\nComment=case 42\n' % digest)
    record = entry(root, name)
    assert (record['State'], record['JobIds'], record['HandOuts']) == (
        'handed-out', job_id, '1')
    assert message == 'Success: handed out client_1/000001 (collect.sh)'


def test_job_request_answers_252_when_nothing_is_queued(root):
    status, job_id, body, message = ask(make_site(root))
    assert (status, job_id, body, message) == (252, None, b'',
                                               'No job queued')


def test_job_request_for_another_queue_name_is_404(root):
    queue(root, '--client', 'client_1')
    assert request(make_site(root), 'JOB', query(filename='other'))[0] == 404


def test_job_request_takes_only_the_authenticated_clients_queue(root):
    queue(root, '--client', 'client_2')
    site = make_site(root, RequireUser=True)
    environ = {'REQUEST_METHOD': 'JOB', 'QUERY_STRING': query('client_2'),
               'REMOTE_USER': 'client_1', 'CONTENT_LENGTH': '0'}
    exchange = nph_webjob.process_request(environ, io.BytesIO(), site)
    assert exchange.status == 453
    assert entry(root, 'client_2/000001')['State'] == 'queued'


def test_entries_go_out_by_priority_then_age(root):
    queue(root, '--client', 'client_1', '--args', 'first')
    queue(root, '--client', 'client_1', '--args', 'urgent', '--priority', '1')
    site = make_site(root)
    lines = [ask(site)[2].decode().splitlines()[1] for n in range(2)]
    assert lines == ['CommandLine=collect.sh urgent',
                     'CommandLine=collect.sh first']


def test_get_keeps_the_job_id_of_a_queued_job(root):
    queue(root, '--client', 'client_1')
    site = make_site(root)
    job_id = ask(site)[1]
    status, given, body, message = request(site, 'GET', query(
        filename='collect.sh'), job_id=job_id)
    assert (status, given, body) == (200, job_id, COLLECT)


def test_get_makes_its_own_job_id_while_job_queues_are_off(root):
    site = make_site(root, JobQueueEnable=False)
    status, given, body, message = request(site, 'GET', query(
        filename='collect.sh'), job_id='chosen_by_client')
    assert status == 200 and given != 'chosen_by_client'


# Results and states ##########################################################

def test_a_result_marks_its_entry_done(root):
    name, = queue(root, '--client', 'client_1')
    site = make_site(root)
    job_id = ask(site)[1]
    status, given, body, message = upload(site, job_id)
    record = entry(root, name)
    assert status == 200 and record['State'] == 'done'
    assert os.path.exists(str(root / 'incoming' / (record['Result'] +
                                                   '.rdy')))
    assert message == 'Success; queue entry client_1/000001 done'


def test_a_failed_job_is_failed_with_why_and_the_log_says_so(root):
    name, = queue(root, '--client', 'client_1')
    site = make_site(root)
    job_id = ask(site)[1]
    message = upload(site, job_id, status=3)[3]
    assert entry(root, name)['State'] == 'failed'
    assert entry(root, name)['Why'] == 'KidStatus=3'
    assert message == ('Stored; job failed: KidStatus=3; queue entry '
                       'client_1/000001 failed')
    with open(str(root / 'logfiles/nph-webjob.log')) as handle:
        assert handle.read().splitlines()[-1].endswith(
            '200 -- Stored; job failed: KidStatus=3; queue entry '
            'client_1/000001 failed')


def test_a_second_result_for_an_entry_is_kept_but_not_counted(root):
    name, = queue(root, '--client', 'client_1')
    site = make_site(root)
    job_id = ask(site)[1]
    first = entry(root, name)
    upload(site, job_id)
    message = upload(site, job_id, status=1)[3]
    record = entry(root, name)
    assert record['State'] == 'done' and first['State'] == 'handed-out'
    assert 'already has a result (%s): kept, not counted' % record[
        'Result'] in message
    assert len([n for n in os.listdir(str(root / 'incoming'))
                if n.endswith('.rdy')]) == 2


def test_an_entry_without_a_result_is_handed_out_again_after_the_limit(root):
    name, = queue(root, '--client', 'client_1')
    clock = Clock()
    site = make_site(root, clock, JobHandOutTimeLimit=600)
    first = ask(site)[1]
    clock.now += 599
    assert ask(site)[0] == 252
    clock.now += 1
    status, second, body, message = ask(site)
    assert status == 200 and second != first
    record = entry(root, name)
    assert record['JobIds'].split() == [first, second]
    assert record['HandOuts'] == '2'
    upload(site, first)             # the late first answer still counts
    assert entry(root, name)['State'] == 'done'


def test_an_entry_handed_out_too_often_fails(root):
    name, = queue(root, '--client', 'client_1')
    clock = Clock()
    site = make_site(root, clock, JobHandOutTimeLimit=10)
    for n in range(nph_webjob.MAX_HAND_OUTS):
        assert ask(site)[0] == 200
        clock.now += 10
    assert ask(site)[0] == 252
    assert entry(root, name)['State'] == 'failed'
    assert entry(root, name)['Why'] == 'handed out 3 times, no result'


def test_an_entry_expires_unhanded(root):
    status, out, err = admin(root, 'job', 'add', '--command', 'collect.sh',
                             '--client', 'client_1', '--expires', '1h')
    assert status == 0, err
    expires = int(entry(root, 'client_1/000001')['Expires'])
    assert ask(make_site(root, Clock(expires)))[0] == 252
    assert entry(root, 'client_1/000001')['State'] == 'expired'


def test_a_cancelled_entry_is_never_handed_out(root):
    name, = queue(root, '--client', 'client_1')
    status, out, err = admin(root, 'job', 'cancel', name)
    assert (status, out) == (0, 'client_1/000001: cancelled\n')
    assert ask(make_site(root))[0] == 252
    status, out, err = admin(root, 'job', 'cancel', name)
    assert (status, out) == (1, 'client_1/000001: not cancelled: already '
                                'cancelled\n')


def test_job_list_shows_each_entry_and_json_lines(root):
    queue(root, '--client', 'client_1,client_2')
    ask(make_site(root))
    status, out, err = admin(root, 'job', 'list')
    assert out.splitlines() == [
        'client_1/000001 handed-out collect.sh - 1 - -',
        'client_2/000001 queued collect.sh - 0 - -']
    status, out, err = admin(root, 'job', 'list', '--json', '--client',
                             'client_2')
    record, = [json.loads(line) for line in out.splitlines()]
    assert (record['kind'], record['name'], record['State']) == (
        'job', 'client_2/000001', 'queued')


def test_job_add_refuses_a_bad_hash_and_writes_nothing(root):
    status, out, err = admin(root, 'job', 'add', '--command', 'collect.sh',
                             '--client', 'client_1', '--sha256', 'abc')
    assert status == 2 and '--sha256: expected 64 hex digits' in err
    assert 'Traceback' not in err
    assert not os.path.exists(str(root / 'jobqueues'))


def test_a_write_cut_short_by_a_crash_leaves_the_entry_as_it_was(root):
    name, = queue(root, '--client', 'client_1')
    folder = root / 'jobqueues/client_1'
    write_file(folder / '.000001.job.4242.tmp', b'State=done\nJobIds=x\n')
    assert ask(make_site(root))[0] == 200         # the temporary is no entry
    assert entry(root, name)['State'] == 'handed-out'
    status, out, err = admin(root, 'job', 'list')
    assert out.splitlines() == ['client_1/000001 handed-out collect.sh - 1 - -']


def test_queue_state_files_are_written_whole(root):
    queue(root, '--client', 'client_1')
    ask(make_site(root))
    names = os.listdir(str(root / 'jobqueues/client_1'))
    assert sorted(names) == ['.lock', '000001.job']


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
def test_queue_survives_a_server_kill(root, standalone_server, python):
    cfg = write_file(root / 'queue.cfg', b'JobQueueEnable=Y\n')
    queue(root, '--client', 'client_1')
    queue(root, '--client', 'client_1')
    server = standalone_server(python, root=str(root),
                               args=['--config', str(cfg)])
    first = http_job(server.port)
    server.stop(signum=9)
    server = standalone_server(python, root=str(root),
                               args=['--config', str(cfg)])
    second = http_job(server.port)
    assert first[0] == second[0] == 200 and first[1] != second[1]
    assert http_job(server.port)[0] == 252
    assert [entry(root, 'client_1/%06d' % n)['State'] for n in (1, 2)] == [
        'handed-out', 'handed-out']


def http_job(port, client='client_1'):
    """One JOB over loopback: (status, Job-Id)."""
    data = ('JOB /cgi-client/nph-webjob.cgi?%s HTTP/1.1\r\nHost: %s:%d\r\n'
            'Content-Type: application/octet-stream\r\nContent-Length: 0\r\n'
            'Connection: close\r\n\r\n' % (query(client), LOOPBACK, port))
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(data.encode())
        reply = sock.makefile('rb').read()
    head = reply.split(b'\r\n\r\n')[0].decode('latin-1').split('\r\n')
    fields = dict(line.split(': ', 1) for line in head[1:])
    return int(head[0].split()[1]), fields.get('Job-Id')


def test_racing_job_requests_hand_an_entry_out_once(root, standalone_server):
    cfg = write_file(root / 'queue.cfg', b'JobQueueEnable=Y\n')
    queue(root, '--client', 'client_1')
    queue(root, '--client', 'client_1')
    servers = [standalone_server(root=str(root), args=['--config', str(cfg)])
               for n in range(2)]
    answers = []
    barrier = threading.Barrier(8)

    def racer(n):
        barrier.wait()
        answers.append(http_job(servers[n % 2].port))

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    given = sorted(job_id for status, job_id in answers if status == 200)
    assert len(given) == 2 and len(set(given)) == 2
    assert sorted(status for status, job_id in answers) == [200] * 2 + \
        [252] * 6
    handed = [entry(root, 'client_1/%06d' % n)['JobIds'] for n in (1, 2)]
    assert sorted(handed) == given


# Hunts #######################################################################

def test_hunt_queues_a_job_for_a_pattern_over_known_clients(root):
    status, out, err = admin(root, 'hunt', 'start', 'h1', '--command',
                             'collect.sh', '--pattern', 'web_*')
    assert (status, out) == (0, 'hunt h1: collect.sh queued for 2 clients\n')
    assert [entry(root, 'web_%d/000001' % n)['Hunt'] for n in (1, 2)] == [
        'h1', 'h1']
    assert not os.path.exists(str(root / 'jobqueues/client_1'))


def test_hunt_takes_a_group_file_and_names_a_bad_line(root, tmp_path):
    group = write_file(tmp_path / 'group', b'# ours\nclient_1\n\nweb_1 # x\n')
    status, out, err = admin(root, 'hunt', 'start', 'h2', '--command',
                             'collect.sh', '--group', str(group))
    assert status == 0 and 'for 2 clients' in out
    write_file(group, b'client_1\n../etc\n')
    status, out, err = admin(root, 'hunt', 'start', 'h3', '--command',
                             'collect.sh', '--group', str(group))
    assert status == 2 and '%s:2: [../etc] is not a client id' % group in err


def test_hunt_rate_hands_out_to_at_most_n_clients_a_minute(root):
    status, out, err = admin(root, 'hunt', 'start', 'h1', '--command',
                             'collect.sh', '--clients',
                             'client_1,client_2,web_1', '--rate', '2')
    assert status == 0, err
    clock = Clock()
    site = make_site(root, clock)
    assert [ask(site, c)[0] for c in ('client_1', 'client_2', 'web_1')] == [
        200, 200, 252]
    clock.now += nph_webjob.RATE_WINDOW
    assert ask(site, 'web_1')[0] == 200


def test_hunt_status_counts_done_failed_pending_and_never_seen(root):
    status, out, err = admin(root, 'hunt', 'start', 'h1', '--command',
                             'collect.sh', '--clients',
                             'client_1,client_2,web_1,web_2', '--rate', '3')
    site = make_site(root)
    upload(site, ask(site, 'client_1')[1], 'client_1')
    upload(site, ask(site, 'client_2')[1], 'client_2', status=2)
    ask(site, 'web_1')                      # running
    ask(site, 'web_2')                      # at the rate: pending
    status, out, err = admin(root, 'hunt', 'status', 'h1')
    lines = out.splitlines()
    assert status == 1
    assert lines[-1] == ('hunt h1: 4 clients: 1 done, 1 failed, 1 running, '
                         '1 pending, 0 never-seen, 0 expired, 0 cancelled')
    assert lines[1].startswith('client_2 failed client_2/000001 client_2_')
    assert lines[1].endswith(' -- KidStatus=2')
    status, out, err = admin(root, 'hunt', 'status', 'h1', '--json')
    records = [json.loads(line) for line in out.splitlines()]
    assert [r['progress'] for r in records[:4]] == ['done', 'failed',
                                                    'running', 'pending']
    assert (records[4]['kind'], records[4]['done'], records[4]['clients']) \
        == ('hunt', 1, 4)


def test_hunt_cancel_cancels_only_open_entries(root):
    admin(root, 'hunt', 'start', 'h1', '--command', 'collect.sh',
          '--clients', 'client_1,client_2')
    site = make_site(root)
    upload(site, ask(site, 'client_1')[1], 'client_1')
    status, out, err = admin(root, 'hunt', 'cancel', 'h1')
    assert (status, out) == (0, 'client_2/000001: cancelled\n')
    assert entry(root, 'client_1/000001')['State'] == 'done'


# Reports #####################################################################

def test_report_shows_failures_list_does_not(root):
    site = make_site(root, JobQueueEnable=False)
    request(site, 'GET', query(filename='collect.sh'))     # never PUT
    upload(site, 'jid_run', status=4)
    upload(site, 'jid_dsv', status='NA', get_error='collect.sh: DSV: '
           'signature verification failed; the payload was deleted')
    upload(site, 'jid_ok')
    status, out, err = admin(root, 'report')
    lines = out.splitlines()
    failures = [line for line in lines if line.startswith('failure ')]
    assert status == 1 and len(failures) == 3
    found = sorted(line.split(' ', 5)[5] for line in failures)
    assert found[0] == 'jid_dsv dsv-veto -- GetError: collect.sh: DSV: ' \
        'signature verification failed; the payload was deleted'
    assert found[1] == 'jid_run failed -- KidStatus=4'
    assert re.match(r'server_1_\d+_\d+ failed -- GET without a PUT\Z',
                    found[2])
    assert lines[-1] == 'report: 3 jobs, 3 failures, 4 clients, 0 hunts'
    assert [line.split()[-3:] for line in lines if line.startswith('job ')] \
        == [['4', 'failed', 'unchecked'], ['NA', 'dsv-veto', 'unchecked'],
            ['0', 'ok', 'unchecked']]


def test_report_json_lines_carry_each_clients_last_contact(root):
    site = make_site(root)
    request(site, 'GET', query(filename='collect.sh'))
    status, out, err = admin(root, 'report', '--json', '--client',
                             'client_1')
    records = [json.loads(line) for line in out.splitlines()]
    client, = [r for r in records if r['kind'] == 'client']
    assert client['client'] == 'client_1'
    assert client['last_request'] == 'GET collect.sh 200'
    assert records[-1] == {'kind': 'summary', 'jobs': 0, 'failures': 1,
                           'clients': 1, 'hunts': 0}


def test_list_shows_na_not_a_dash_for_a_job_that_never_ran(root):
    site = make_site(root, JobQueueEnable=False)
    upload(site, 'jid_get', status='NA', get_error='collect.sh: Status = '
           '[404], Reason = [Not Found]')
    status, out, err = admin(root, 'list')
    assert out.split()[4:6] == ['jid_get', 'NA']


def test_list_and_verify_print_json_lines(root):
    site = make_site(root, JobQueueEnable=False)
    upload(site, 'jid_one', status=2)
    status, out, err = admin(root, 'list', '--json')
    record, = [json.loads(line) for line in out.splitlines()]
    assert (record['kind'], record['client'], record['jid'],
            record['kid_status'], record['err_size']) == (
        'group', 'client_1', 'jid_one', '2', 0)
    assert record['group'].startswith('client_1_')
    status, out, err = admin(root, 'verify', '--json')
    assert status == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        {'kind': 'summary', 'groups': 1, 'manifest_files': 4, 'problems': 0}]
    os.unlink(str(root / 'incoming' / (record['group'] + '.rdy')))
    status, out, err = admin(root, 'verify', '--json')
    records = [json.loads(line) for line in out.splitlines()]
    assert status == 1 and {'kind': 'problem', 'name': record['group'],
                            'problem': 'incomplete: no .rdy'} in records
