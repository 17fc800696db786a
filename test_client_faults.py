"""Faults on the wire: GETs and PUTs cut at random byte offsets (fixed
seed), answered 503, or met by a server killed and restarted mid-upload.

In every trial the evidence ends up stored exactly once, byte-identical,
with `verify` clean, or the client fails with its documented code and keeps
what it has.  The client runs in process (webjob.py's stages, as -e runs
them) against a real standalone server behind the fault proxy, many trials
per server, so that hundreds of cut points stay cheap.
"""

import os
import random
import subprocess
import sys

import pytest

import webjob
from conftest import (CGI_PATH, LOOPBACK, NPH_WEBJOB, FaultPlan, answer_503,
                      stop_process, wait_for_port, write_file)

SEED = 16
CUTS_PER_KIND = 100
TLS_CUTS = 30                   # per stream, over HTTPS
PROGRAM = b'#!/bin/sh\n' + b'# padding\n' * 3000 + b'echo done\n'
OUTPUT = bytes(random.Random(SEED).getrandbits(8) for _ in range(48 * 1024))


class Trials(object):
    """A client side for many trials against one server through a proxy."""

    def __init__(self, server, proxy, folder, scheme='http', **controls):
        self.server = server
        self.proxy = proxy
        self.folder = folder
        self.url = '%s://%s:%d%s' % (scheme, LOOPBACK, proxy.port, CGI_PATH)
        self.controls = controls
        self.count = 0
        self.sent = {}          # Job-Id -> the .out bytes
        write_file(os.path.join(str(server.root),
                                'profiles/client_1/commands/big.sh'),
                   PROGRAM, 0o755)

    def values(self, **controls):
        path = os.path.join(self.folder, 'trial.cfg')
        settings = dict(ClientId='client_1', URLGetURL=self.url,
                        URLPutURL=self.url, PutRetryCount=4, PutRetryDelay=0,
                        PutStallTimeLimit=30, TempDirectory=self.folder)
        settings.update(self.controls)
        settings.update(controls)
        with open(path, 'w') as handle:
            handle.writelines('%s=%s\n' % pair for pair in settings.items())
        return webjob.read_config(path, webjob.CLIENT_CONTROLS)

    def new_job(self, **controls):
        self.count += 1
        job = webjob.configure_job(self.values(**controls), 'big.sh', [])
        path = job.output_path('out')
        write_file(path, OUTPUT)
        job.outputs.append(path)
        job.job_id = 'trial_%d' % self.count
        return job

    def put(self, plan=None, **controls):
        """Run one PUT stage; on success the job counts as sent."""
        if plan is not None:
            self.proxy.plan(plan)
        job = self.new_job(**controls)
        try:
            webjob.run_put_stage(job)
        except webjob.PutStageError as exc:
            kept = job.output_path('kept')
            assert os.path.exists(kept), 'failed and kept nothing: %s' % exc
            return exc
        assert not os.path.exists(job.output_path('kept'))
        self.sent[job.job_id] = OUTPUT
        return None

    def check_stored_once(self):
        """Every sent job is one group in incoming/, its .out identical."""
        incoming = os.path.join(str(self.server.root), 'incoming')
        seen = {}
        for name in os.listdir(incoming):
            if name.endswith('.rdy'):
                group = os.path.join(incoming, name[:-4])
                with open(group + '.rdy') as handle:
                    jid = handle.read().strip().split('=', 1)[1]
                with open(group + '.out', 'rb') as handle:
                    assert handle.read() == self.sent.get(jid), jid
                seen[jid] = seen.get(jid, 0) + 1
        assert seen == dict((jid, 1) for jid in self.sent)
        result = subprocess.run([sys.executable, NPH_WEBJOB, 'verify',
                                 '--root', str(self.server.root)],
                                stdout=subprocess.PIPE)
        assert result.returncode == 0, result.stdout.decode()

    def calibrate(self):
        """(request bytes, response bytes) of one undisturbed PUT."""
        before = len(self.proxy.traffic)
        assert self.put() is None
        return self.proxy.wait_traffic(before + 1)[before]


@pytest.fixture
def trials(standalone_server, fault_proxy, tmp_path):
    server = standalone_server()
    folder = tmp_path / 'client'
    folder.mkdir()
    return Trials(server, fault_proxy(server.port), str(folder))


def test_puts_cut_anywhere_in_the_request_are_stored_once(trials):
    request, response = trials.calibrate()
    rng = random.Random(SEED)
    for _ in range(CUTS_PER_KIND):
        cut = rng.randrange(0, request - 16)
        assert trials.put(FaultPlan(request_cut=cut,
                                    reset=rng.random() < 0.5)) is None
    assert trials.proxy.cuts == CUTS_PER_KIND
    trials.check_stored_once()


def test_puts_cut_anywhere_in_the_answer_are_stored_once(trials):
    request, response = trials.calibrate()
    rng = random.Random(SEED + 1)
    for _ in range(CUTS_PER_KIND):
        cut = rng.randrange(0, response)
        assert trials.put(FaultPlan(response_cut=cut,
                                    reset=rng.random() < 0.5)) is None
    assert trials.proxy.cuts == CUTS_PER_KIND
    trials.check_stored_once()


def test_gets_cut_anywhere_never_leave_a_partial_program(trials):
    rng = random.Random(SEED + 2)
    length = len(PROGRAM) + 200
    failed = 0
    for _ in range(CUTS_PER_KIND):
        trials.proxy.plan(FaultPlan(response_cut=rng.randrange(0, length),
                                    reset=rng.random() < 0.5))
        job = trials.new_job(OverwriteExecutable='Y')
        installed = job.path('big.sh')
        try:
            webjob.run_get_stage(job)
        except webjob.GetStageError as exc:
            assert webjob.GetStageError.exit_code == 8, exc
            assert not os.path.exists(installed)
            failed += 1
        else:
            with open(installed, 'rb') as handle:
                assert handle.read() == PROGRAM
            os.unlink(installed)
        assert not [n for n in os.listdir(trials.folder) if n.endswith(
            '.get')]
    assert trials.proxy.cuts >= CUTS_PER_KIND - 5 and failed > CUTS_PER_KIND / 2


def test_tls_puts_cut_anywhere_are_stored_once(standalone_server,
                                               fault_proxy, pki, tmp_path):
    """Over HTTPS the cut falls in the handshake, in the 1 MiB writes of
    the body or in the answer's record."""
    server = standalone_server(args=['--tls-cert', pki.path(
        'server-chain.pem'), '--tls-key', pki.path('server.key')])
    folder = tmp_path / 'client'
    folder.mkdir()
    trials = Trials(server, fault_proxy(server.port), str(folder), 'https',
                    SSLVerifyPeerCert='Y', SSLExpectedPeerCN='webjob.test',
                    SSLBundledCAsFile=pki.path('ca.crt'))
    request, response = trials.calibrate()
    rng = random.Random(SEED + 5)
    for number in range(2 * TLS_CUTS):
        plan = FaultPlan(request_cut=rng.randrange(0, request - 16)) if \
            number % 2 else FaultPlan(response_cut=rng.randrange(0, response))
        assert trials.put(plan) is None
    assert trials.proxy.cuts == 2 * TLS_CUTS
    trials.check_stored_once()


def test_a_tls_put_of_several_blocks_arrives_whole(standalone_server,
                                                  fault_proxy, pki, tmp_path):
    """Over TLS the body goes out in 1 MiB writes: a length that is not a
    multiple of the block, on both Pythons' ssl, arrives byte-identical."""
    server = standalone_server(args=['--tls-cert', pki.path(
        'server-chain.pem'), '--tls-key', pki.path('server.key')])
    folder = tmp_path / 'client'
    folder.mkdir()
    trials = Trials(server, fault_proxy(server.port), str(folder), 'https',
                    SSLVerifyPeerCert='Y', SSLExpectedPeerCN='webjob.test',
                    SSLBundledCAsFile=pki.path('ca.crt'))
    job = trials.new_job()
    data = OUTPUT * 70 + b'tail'          # 3 MiB + 1 KiB + 4 bytes
    write_file(job.output_path('out'), data)
    webjob.run_put_stage(job)
    trials.sent[job.job_id] = data
    trials.check_stored_once()


def test_503_answers_are_retried_until_stored_once(trials):
    rng = random.Random(SEED + 3)
    for _ in range(20):
        busy = rng.randrange(0, 4)
        trials.proxy.plan(*[FaultPlan(answer=answer_503())
                            for _ in range(busy)])
        assert trials.put() is None
    trials.check_stored_once()


def test_retries_used_up_keep_the_output_and_exit_put_stage(trials):
    trials.proxy.plan(*[FaultPlan(answer=answer_503()) for _ in range(5)])
    failure = trials.put()
    assert isinstance(failure, webjob.PutStageError)
    assert failure.exit_code == 10 and 'files are kept in' in str(failure)
    trials.check_stored_once()


def test_a_server_killed_and_restarted_mid_upload_stores_once(trials):
    server = trials.server
    request, response = trials.calibrate()
    rng = random.Random(SEED + 4)
    restarted = []

    def kill_and_restart():
        stop_process(server.proc if not restarted else restarted[-1],
                     timeout=0)
        proc = subprocess.Popen(
            [sys.executable, NPH_WEBJOB, 'serve', '--root', str(server.root),
             '--port', str(server.port)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        restarted.append(proc)
        wait_for_port(LOOPBACK, server.port, proc=proc)

    try:
        for number in range(6):
            if number % 2:
                plan = FaultPlan(response_cut=rng.randrange(0, response),
                                 on_cut=kill_and_restart)
            else:
                plan = FaultPlan(request_cut=rng.randrange(0, request - 16),
                                 on_cut=kill_and_restart)
            assert trials.put(plan) is None
        assert len(restarted) == 6
        trials.check_stored_once()
    finally:
        for proc in restarted:
            stop_process(proc)
