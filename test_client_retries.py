"""Delivery: PUT retries inside PutTimeLimit, the .kept marker and
UnlinkOutput, --resend, and the linktest before RUN (README, "Delivery").

Every test runs the real client against the real standalone server; the
fault proxy of conftest.py stands in for a failing network or front end.
"""

import os
import subprocess
import sys

import pytest

from conftest import (CGI_PATH, LOOPBACK, NPH_WEBJOB, NEWEST_PY, OLDEST_PY,
                      WEBJOB, FaultPlan, answer_503, free_port, read_log_lines)

BOTH_PYTHONS = pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                                       ids=lambda p: p.split('/')[-3])


def run_webjob(args, stdin=None, timeout=120, python=None):
    return subprocess.run([python or sys.executable, WEBJOB] + list(args),
                          input=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)


def config(put_url, get_url, temp, **controls):
    lines = ['ClientId=client_1', 'URLGetURL=%s' % get_url,
             'URLPutURL=%s' % put_url, 'TempDirectory=%s' % temp]
    lines += ['%s=%s' % pair for pair in sorted(controls.items())]
    return ('\n'.join(lines) + '\n').encode()


def groups(server):
    return sorted(name[:-4] for name in server.incoming()
                  if name.endswith('.rdy'))


def verify_clean(server):
    result = subprocess.run([sys.executable, NPH_WEBJOB, 'verify', '--root',
                             str(server.root)], stdout=subprocess.PIPE)
    assert result.returncode == 0, result.stdout
    return result.stdout.decode()


@pytest.fixture
def site(standalone_server, fault_proxy, tmp_path):
    """A server, a fault proxy in front of it, and a TempDirectory."""
    server = standalone_server()
    proxy = fault_proxy(server.port)
    temp = tmp_path / 'temp'
    temp.mkdir()
    return server, proxy, temp


def test_a_503_is_retried_and_the_upload_stored_once(site):
    server, proxy, temp = site
    proxy.plan(FaultPlan(answer=answer_503()), FaultPlan(answer=answer_503()))
    cfg = config(proxy.url(CGI_PATH), server.cgi_url, temp, PutRetryCount=3,
                 PutRetryDelay=0)
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert err.count('PutStage: attempt') == 2 and 'Status = [503]' in err
    assert proxy.connections == 3 and len(groups(server)) == 1
    assert not [n for n in os.listdir(str(temp)) if n.endswith('.kept')]
    verify_clean(server)


@BOTH_PYTHONS
def test_a_lost_answer_is_retried_and_recognised_as_stored(site, python):
    server, proxy, temp = site
    proxy.plan(FaultPlan(response_cut=12))      # the server stored, then cut
    cfg = config(proxy.url(CGI_PATH), server.cgi_url, temp, PutRetryCount=2,
                 PutRetryDelay=0)
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg, python=python)
    assert result.returncode == 0, result.stderr
    assert len(groups(server)) == 1
    lines = read_log_lines(server.root, 3)
    assert [line.split()[11] for line in lines[1:]] == ['200', '253']
    verify_clean(server)


@BOTH_PYTHONS
def test_refused_connections_are_retried_then_the_output_is_kept(tmp_path,
                                                                 python):
    temp = tmp_path / 'temp'
    temp.mkdir()
    dead = 'http://%s:%d%s' % (LOOPBACK, free_port(), CGI_PATH)
    cfg = config(dead, dead, temp, PutRetryCount=2, PutRetryDelay=0,
                 UploadOnGetFailure='Y', UnlinkOutput='Y')
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg, python=python)
    err = result.stderr.decode()
    assert result.returncode == 11, err      # GET and PUT failed
    assert 'attempt 1 of 3 failed' in err and 'attempt 2 of 3 failed' in err
    names = sorted(os.listdir(str(temp)))
    stem = names[0].rsplit('.', 1)[0]
    assert names == [stem + '.' + ext for ext in ('env', 'err', 'kept', 'out')]
    assert 'the output files are kept in %s: %s.out %s.err %s.env' % (
        temp, stem, stem, stem) in err and '--resend' in err


def test_a_permanent_refusal_is_not_retried(site, tmp_path):
    server, proxy, temp = site
    refusal = (b'HTTP/1.1 455 Content-Length Exceeds Limit\r\n'
               b'Content-Length: 0\r\n\r\n')
    proxy.plan(FaultPlan(answer=refusal))
    cfg = config(proxy.url(CGI_PATH), server.cgi_url, temp, PutRetryCount=5,
                 PutRetryDelay=0)
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg)
    err = result.stderr.decode()
    assert result.returncode == 10, err
    assert 'Status = [455]' in err and 'attempt' not in err
    assert proxy.connections == 1 and groups(server) == []


def test_no_retry_starts_that_would_end_after_PutTimeLimit(site):
    server, proxy, temp = site
    proxy.plan(FaultPlan(answer=answer_503()))
    cfg = config(proxy.url(CGI_PATH), server.cgi_url, temp, PutRetryCount=5,
                 PutRetryDelay=600, PutRetryMaxDelay=600,
                 PutTimeLimit=300)
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg)
    err = result.stderr.decode()
    assert result.returncode == 10, err
    assert 'PutTimeLimit (300 s) leaves no time for attempt 2' in err
    assert proxy.connections == 1


def test_without_retry_controls_one_put_and_no_job_id_is_made_up(site):
    server, proxy, temp = site
    proxy.plan(FaultPlan(answer=answer_503()))
    cfg = config(proxy.url(CGI_PATH), server.cgi_url, temp)
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg)
    assert result.returncode == 10
    assert proxy.connections == 1 and 'attempt' not in result.stderr.decode()


@BOTH_PYTHONS
def test_unlink_output_waits_for_the_resend_that_is_confirmed(site, python):
    server, proxy, temp = site
    proxy.plan(FaultPlan(answer=answer_503()))
    cfg_data = config(proxy.url(CGI_PATH), server.cgi_url, temp,
                      UnlinkOutput='Y')
    assert run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg_data,
                      python=python).returncode == 10
    kept = [n for n in os.listdir(str(temp)) if n.endswith('.kept')]
    assert len(kept) == 1 and groups(server) == []
    cfg = temp.parent / 'resend.cfg'
    cfg.write_bytes(cfg_data)
    result = run_webjob(['--resend', '-f', str(cfg)], python=python)
    assert result.returncode == 0 and result.stderr == b'', result.stderr
    assert os.listdir(str(temp)) == ['hostname.sh'] and len(groups(server)) == 1
    again = run_webjob(['--resend', '-f', str(cfg)])     # nothing left
    assert again.returncode == 0 and len(groups(server)) == 1


def test_resend_sends_every_kept_group_oldest_first_each_once(site):
    server, proxy, temp = site
    proxy.plan(*[FaultPlan(answer=answer_503()) for _ in range(3)])
    cfg_data = config(proxy.url(CGI_PATH), server.cgi_url, temp,
                      OverwriteExecutable='Y')
    for number in range(3):
        assert run_webjob(['-e', '-f', '-', 'hostname.sh', str(number)],
                          cfg_data).returncode == 10
    # Age the kept groups (their names carry the job's epoch): run 0 the
    # oldest, then run 2, then run 1.
    for name in [n for n in os.listdir(str(temp)) if n.endswith('.kept')]:
        stem = name[:-5]
        number = env_record(temp / (stem + '.env'))['CommandLine'][-1]
        epoch = stem.split('_')[1]
        older = stem.replace(epoch, str(int(epoch) - {'0': 300, '1': 100,
                                                      '2': 200}[number]))
        for ext in ('out', 'err', 'env', 'kept'):
            os.rename(str(temp / (stem + '.' + ext)),
                      str(temp / (older + '.' + ext)))
    cfg = temp.parent / 'resend.cfg'
    cfg.write_bytes(cfg_data)
    result = run_webjob(['--resend', '-f', str(cfg)])
    assert result.returncode == 0, result.stderr
    sent = [line.split()[2] for line in read_log_lines(server.root, 6)[3:]]
    stored = dict((record['Jid'], record['CommandLine']) for record in (
        env_record(os.path.join(str(server.root), 'incoming', group + '.env'))
        for group in groups(server)))
    assert [stored[jid] for jid in sent] == ['hostname.sh 0', 'hostname.sh 2',
                                             'hostname.sh 1']
    assert not [n for n in os.listdir(str(temp)) if n.endswith('.kept')]
    verify_clean(server)


def env_record(path):
    with open(str(path)) as handle:
        return dict(line.split('=', 1) for line in handle.read().splitlines())


def test_linktest_runs_before_the_program_and_stops_it_when_refused(site):
    server, proxy, temp = site
    refusal = b'HTTP/1.1 452 Username Undefined\r\nContent-Length: 0\r\n\r\n'
    proxy.plan(FaultPlan(answer=refusal))
    cfg = config(proxy.url(CGI_PATH), server.cgi_url, temp, PutLinkTest='Y')
    marker = temp.parent / 'ran'
    result = run_webjob(['-e', '-f', '-', 'hostname.sh', '>', str(marker)],
                        cfg)
    err = result.stderr.decode()
    assert result.returncode == 10, err
    assert 'linktest' in err and 'Status = [452]' in err and 'not run' in err
    assert os.listdir(str(temp)) == ['hostname.sh']      # nothing collected


def test_linktest_is_answered_251_and_then_the_job_runs(site):
    server, proxy, temp = site
    cfg = config(server.cgi_url, server.cgi_url, temp, PutLinkTest='Y')
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg)
    assert result.returncode == 0, result.stderr
    lines = read_log_lines(server.root, 3)
    assert [(line.split()[5], line.split()[11]) for line in lines] == [
        ('GET', '200'), ('PUT', '251'), ('PUT', '200')]
    assert len(groups(server)) == 1


def test_a_stalled_attempt_is_abandoned_after_PutStallTimeLimit(site):
    """A server that accepts and then never reads nor answers: the attempt
    ends when nothing has moved for PutStallTimeLimit, and is retried."""
    import socket
    server, proxy, temp = site
    silent = socket.socket()
    silent.bind((LOOPBACK, 0))
    silent.listen(8)            # the kernel accepts; nobody ever reads
    try:
        url = 'http://%s:%d%s' % (LOOPBACK, silent.getsockname()[1], CGI_PATH)
        cfg = config(url, server.cgi_url, temp, PutRetryCount=1,
                     PutRetryDelay=0, PutStallTimeLimit=1)
        result = run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg)
    finally:
        silent.close()
    err = result.stderr.decode()
    assert result.returncode == 10, err
    assert err.count('PutStallTimeLimit (1 s) expired') == 2, err
    assert 'attempt 1 of 2 failed' in err and 'files are kept in' in err
