"""The server cannot forge evidence through the client (issue 12).

A hostile or broken server answers; the client must refuse what the
original's rules (protocol.md 1.3) and the server side's own checks do not
allow, and never leave an unverified program on the host.
"""

import os

import pytest

import webjob

from test_client import (PROGRAM_BODY, assert_clean_error, basic_cfg,
                         job_dir, output_files, run_webjob, scripted)


def get_answer(head, body=PROGRAM_BODY):
    """Answer the GET with head (status line and fields), PUT with 200."""
    def respond(request):
        if request.method == 'GET':
            return head + body
        return b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n'
    return respond


def assert_nothing_ran(result, job_dir):
    assert_clean_error(result, 8, 'GetStage')
    assert result.stdout == b''
    assert not os.path.exists(str(job_dir / 'job.sh'))


@pytest.mark.parametrize('job_id', [
    b'j1\x0bHostname=FORGED\x0bClientId=client_9', b'j1\x00x', b'j1\x1b[2J',
    b'j1\x0cx', b'j 1', b'j1/../x', b'j1\xc3\xa9'])
def test_job_id_is_restricted_to_what_the_server_accepts(tmp_path, scripted, job_dir,
                                                         job_id):
    scripted.respond = get_answer(
        b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nJob-Id: %s\r\n\r\n'
        % (len(PROGRAM_BODY), job_id))
    cfg = basic_cfg(tmp_path, scripted, job_dir, UploadOnGetFailure='Y')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_nothing_ran(result, job_dir)
    assert 'Job-Id' in result.stderr.decode()
    put = scripted.requests[-1]
    assert put.method == 'PUT' and put.header('Job-Id') is None
    lines = put.body.split(b'Version=', 1)[1].split(b'\n')
    assert [line for line in lines if line.startswith(b'ClientId=')] == [
        b'ClientId=client_1']
    assert len([line for line in lines if line.startswith(b'Hostname=')]) == 1
    assert b'Jid=NA' in lines
    assert not any(0 < byte < 32 and byte != 10 for byte in put.body[-2000:])


def test_chunked_response_with_a_content_length_is_refused(tmp_path, scripted,
                                                           job_dir):
    chunked = b'%x\r\n%s\r\n0\r\n\r\n' % (len(PROGRAM_BODY), PROGRAM_BODY)
    scripted.respond = get_answer(
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: '
        b'%d\r\n\r\n' % len(chunked), chunked)
    result = run_webjob(['-e', '-f', basic_cfg(tmp_path, scripted, job_dir),
                         'job.sh'])
    assert_nothing_ran(result, job_dir)
    assert 'Transfer-Encoding' in result.stderr.decode()
    assert os.listdir(str(job_dir)) == []


def head_of_size(size):
    """A 200 header block of exactly size bytes, blank line included."""
    start = b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Pad: ' % len(PROGRAM_BODY)
    head = start + b'a' * (size - len(start) - 4) + b'\r\n\r\n'
    assert len(head) == size
    return head


def test_header_block_of_16383_bytes_is_accepted(tmp_path, scripted, job_dir):
    scripted.respond = get_answer(head_of_size(16383))
    result = run_webjob(['-e', '-f', basic_cfg(tmp_path, scripted, job_dir,
                                               put=False), 'job.sh'])
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'hello \n'


def test_header_block_of_16384_bytes_is_refused(tmp_path, scripted, job_dir):
    scripted.respond = get_answer(head_of_size(16384))
    result = run_webjob(['-e', '-f', basic_cfg(tmp_path, scripted, job_dir,
                                               put=False), 'job.sh'])
    assert_nothing_ran(result, job_dir)
    assert '16383' in result.stderr.decode()


def test_put_answer_without_content_length_fails_the_put_stage(tmp_path, scripted,
                                                               job_dir):
    scripted.respond = lambda request: (
        scripted.default_response(request) if request.method == 'GET'
        else b'HTTP/1.1 200 OK\r\n\r\n')
    result = run_webjob(['-e', '-f', basic_cfg(tmp_path, scripted, job_dir),
                         'job.sh'])
    assert_clean_error(result, 10, 'PutStage', 'Content-Length')


@pytest.mark.parametrize('digits', [20, 5000])
def test_huge_content_length_is_one_clear_line(tmp_path, scripted, job_dir, digits):
    scripted.respond = get_answer(b'HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\n'
                                % (b'9' * digits))
    result = run_webjob(['-e', '-f', basic_cfg(tmp_path, scripted, job_dir),
                         'job.sh'])
    assert_nothing_ran(result, job_dir)
    assert 'Content-Length' in result.stderr.decode()
    assert len(result.stderr) < 300


def hook_cfg(tmp_path, scripted, job_dir, command, put=True, **extra):
    return basic_cfg(tmp_path, scripted, job_dir, put=put, GetHookEnable='Y',
                     GetHookSuffix='.gpg', GetHookStatus='0',
                     GetHookCommandLine=command, **extra)


@pytest.mark.parametrize('unlink', ['Y', 'N'])
def test_get_hook_veto_leaves_no_program_behind(tmp_path, scripted, job_dir, unlink):
    # Like gpg on a tampered file: the payload is written, then status 2.
    cfg = hook_cfg(tmp_path, scripted, job_dir, 'cp %vp %tp; exit 2',
                   UnlinkExecutable=unlink)
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_clean_error(result, 8, 'GetHook', 'status 2')
    left = os.listdir(str(job_dir))
    assert 'job.sh' not in left and 'job.sh.gpg' not in left, left


def test_get_hook_killed_at_get_time_limit_leaves_no_program(tmp_path, scripted,
                                                             job_dir):
    cfg = hook_cfg(tmp_path, scripted, job_dir,
                   'cp %vp %tp; touch made; exec sleep 120', GetTimeLimit='8')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_clean_error(result, 8, 'GetTimeLimit')
    left = os.listdir(str(job_dir))
    assert 'made' in left
    assert 'job.sh' not in left and 'job.sh.gpg' not in left, left


def test_stale_target_does_not_break_the_next_run_with_overwrite(
        tmp_path, scripted, job_dir):
    # noclobber, as gpg refuses to write over an existing output file
    cfg = hook_cfg(tmp_path, scripted, job_dir, 'set -C; cat %vp > %tp',
                   OverwriteExecutable='Y', put=False)
    (job_dir / 'job.sh').write_bytes(b'#!/bin/sh\necho stale\n')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'hello \n'


def test_without_overwrite_a_stale_target_is_refused_and_kept(tmp_path, scripted,
                                                              job_dir):
    cfg = hook_cfg(tmp_path, scripted, job_dir, 'cat %vp > %tp')
    (job_dir / 'job.sh').write_bytes(b'#!/bin/sh\necho stale\n')
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_clean_error(result, 8, 'OverwriteExecutable=N')
    assert (job_dir / 'job.sh').read_bytes() == b'#!/bin/sh\necho stale\n'
    assert [r.method for r in scripted.requests] == []
    assert output_files(job_dir, 'env') == []


def test_the_output_hash_has_the_bytes_written_as_the_follow_ends(
        tmp_path, monkeypatch):
    """The hasher thread's read finds nothing, then the program writes its
    last bytes and exits, and finish() is called, all before the thread
    looks again: those bytes are hashed all the same (a loaded machine made
    this interleaving, and the server flagged the upload as a mismatch)."""
    import hashlib
    import threading
    path = tmp_path / 'job.out'
    path.write_bytes(b'')
    data = b'job 7 of the fleet\n'
    first_read = threading.Event()
    written = threading.Event()
    real_open = open

    class RacingFile(object):
        """The hasher's file; its first empty read lets the program write
        and the job finish before the read returns."""
        def __init__(self, *args, **kwargs):
            self.raw = real_open(*args, **kwargs)
            self.raced = False

        def readinto(self, buf):
            count = self.raw.readinto(buf)
            if not count and not self.raced:
                self.raced = True
                first_read.set()
                assert written.wait(60)
            return count

        def close(self):
            self.raw.close()

    monkeypatch.setattr(webjob, 'open', RacingFile, raising=False)
    hasher = webjob.FileHasher(str(path), 'sha256')
    assert first_read.wait(60)
    with real_open(str(path), 'ab') as handle:    # the program's last write
        handle.write(data)
    finisher = threading.Thread(target=lambda: setattr(
        finisher, 'result', hasher.finish()))
    hasher.done = True              # finish() has begun: done is set first
    written.set()
    finisher.start()
    finisher.join(60)
    assert finisher.result == (len(data), hashlib.sha256(data).hexdigest())
