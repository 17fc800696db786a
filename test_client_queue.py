"""webjob.py --job: ask the server for the next queued job(s), run each
under the usual GET/RUN/PUT stages, refuse a program whose hash differs
from the pin.  Real client processes (the oldest and newest Python) against
a real 'nph_webjob.py serve' on loopback."""

import json
import os
import subprocess
import sys

import pytest

import nph_webjob
from conftest import (NPH_WEBJOB, NEWEST_PY, OLDEST_PY, WEBJOB,
                      write_file)
from conftest import read_queue_entry as entry

COLLECT = b'#!/bin/sh\necho "collected $*"\n'
FAILING = b'#!/bin/sh\necho "broken" >&2\nexit 5\n'


def admin(root, *args):
    proc = subprocess.Popen([sys.executable, NPH_WEBJOB] + list(args) +
                            ['--root', str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.decode()


def run_client(python, cfg, *args):
    """webjob.py --job -f cfg [count]: (status, stdout, stderr)."""
    proc = subprocess.Popen([python, '-I', '-S', WEBJOB, '--job', '-f',
                             str(cfg)] + list(args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def site(server_root, standalone_server, tmp_path):
    """A queue-enabled standalone server and a client config for it."""
    commands = server_root / 'profiles/common/commands'
    write_file(commands / 'collect.sh', COLLECT, 0o755)
    write_file(commands / 'failing.sh', FAILING, 0o755)
    cfg = write_file(tmp_path / 'server.cfg', b'JobQueueEnable=Y\n')
    server = standalone_server(root=str(server_root),
                               args=['--config', str(cfg)])
    work = tmp_path / 'client'
    work.mkdir()
    client_cfg = write_file(tmp_path / 'client.cfg', (
        'ClientId=client_1\nURLGetURL=%s\nURLPutURL=%s\nTempDirectory=%s\n'
        % (server.cgi_url, server.cgi_url, work)).encode())
    return server, client_cfg, work


def uploads(root, ext):
    folder = os.path.join(str(root), 'incoming')
    return sorted(name for name in os.listdir(folder)
                  if name.endswith('.' + ext))


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY])
def test_job_mode_runs_every_queued_job_and_ties_each_result(site, python):
    server, cfg, work = site
    admin(server.root, 'job', 'add', '--client', 'client_1', '--command',
          'collect.sh', '--args', 'first')
    admin(server.root, 'job', 'add', '--client', 'client_1', '--command',
          'collect.sh', '--args', 'second run', '--pin')
    status, out, err = run_client(python, cfg)
    assert (status, out, err) == (0, '', '')
    records = [entry(server.root, 'client_1/%06d' % n) for n in (1, 2)]
    assert [r['State'] for r in records] == ['done', 'done']
    for record, words in zip(records, ('first', 'second run')):
        base = os.path.join(str(server.root), 'incoming', record['Result'])
        with open(base + '.out', 'rb') as handle:
            assert handle.read() == ('collected %s\n' % words).encode()
        env = nph_webjob.read_key_values(base + '.env')
        assert env['Jid'] == record['JobIds']
        assert env['CommandLine'] == 'collect.sh ' + words
    # INFO: a line is written after its answer, so two may swap places
    methods = sorted(line.split()[5] for line in server.log_lines(7))
    assert methods == ['GET', 'GET', 'JOB', 'JOB', 'JOB', 'PUT', 'PUT']


def test_report_shows_the_servers_hash_check_of_queued_results(site):
    server, cfg, work = site
    admin(server.root, 'job', 'add', '--client', 'client_1', '--command',
          'collect.sh')
    assert run_client(NEWEST_PY, cfg)[0] == 0
    proc = subprocess.Popen([sys.executable, NPH_WEBJOB, 'report', '--json',
                             '--root', str(server.root)],
                            stdout=subprocess.PIPE)
    records = [json.loads(line) for line in
               proc.communicate(timeout=60)[0].decode().splitlines()]
    job, = [r for r in records if r['kind'] == 'job']
    assert (job['result'], job['hashes'], job['kid_status']) == (
        'ok', 'match:MD5', '0')
    assert proc.returncode == 0


def test_job_mode_refuses_a_program_whose_hash_differs_from_the_pin(site):
    server, cfg, work = site
    admin(server.root, 'job', 'add', '--client', 'client_1', '--command',
          'collect.sh', '--sha256', '0' * 64)
    status, out, err = run_client(NEWEST_PY, cfg)
    assert status == 8
    assert err == ('webjob: GetStage: collect.sh: SHA256 of the download '
                   'differs from the pinned CommandSha256; the payload was '
                   'deleted\n')
    record = entry(server.root, 'client_1/000001')
    assert record['State'] == 'failed'
    assert record['Why'].startswith('GetError: collect.sh: SHA256 of the '
                                    'download differs')
    assert not os.path.exists(str(work / 'collect.sh'))
    assert uploads(server.root, 'out') == [record['Result'] + '.out']
    with open(os.path.join(str(server.root), 'incoming',
                           record['Result'] + '.out'), 'rb') as handle:
        assert handle.read() == b''         # it never ran


def test_job_mode_reports_a_failing_job_as_failed(site):
    server, cfg, work = site
    admin(server.root, 'job', 'add', '--client', 'client_1', '--command',
          'failing.sh')
    status, out, err = run_client(NEWEST_PY, cfg)
    assert status == 0                  # the stages worked; the kid did not
    record = entry(server.root, 'client_1/000001')
    assert (record['State'], record['Why']) == ('failed', 'KidStatus=5')
    put, = [line for line in server.log_lines(4) if ' PUT ' in line]
    assert put.endswith(' 200 -- Stored; job failed: KidStatus=5; hashes '
                        'match (MD5); queue entry client_1/000001 failed')


def test_job_mode_with_nothing_queued_does_nothing(site):
    server, cfg, work = site
    status, out, err = run_client(NEWEST_PY, cfg)
    assert (status, out, err) == (0, '', '')
    assert os.listdir(str(work)) == []
    assert server.log_lines(1)[0].endswith(' JOB client_1 default 0 0 0 252 '
                                           '-- No job queued')


def test_job_mode_count_limits_the_jobs_taken(site):
    server, cfg, work = site
    for n in range(3):
        admin(server.root, 'job', 'add', '--client', 'client_1', '--command',
              'collect.sh')
    assert run_client(NEWEST_PY, cfg, '2')[0] == 0
    assert [entry(server.root, 'client_1/%06d' % n)['State']
            for n in (1, 2, 3)] == ['done', 'done', 'queued']


def test_job_mode_against_a_server_without_queues_is_a_get_stage_error(
        server_root, standalone_server, tmp_path):
    server = standalone_server(root=str(server_root))
    cfg = write_file(tmp_path / 'client.cfg', (
        'ClientId=client_1\nURLGetURL=%s\nTempDirectory=%s\n'
        % (server.cgi_url, tmp_path)).encode())
    status, out, err = run_client(NEWEST_PY, cfg)
    assert (status, err) == (8, 'webjob: JOB: Status = [405], Reason = '
                                '[Method Not Allowed]\n')


@pytest.mark.parametrize('count', ['0', 'x', '1001'])
def test_job_mode_refuses_a_bad_count(tmp_path, count):
    status, out, err = run_client(NEWEST_PY, tmp_path / 'none.cfg', count)
    assert status == 2
    assert err.splitlines()[0] == ('webjob: count = [%s]: expected 1-1000 '
                                   'jobs' % count)
