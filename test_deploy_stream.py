"""Resumable and streamed uploads through the real front ends: nph-webjob.cgi
under Apache (mod_cgi streams the request body to the CGI, so a cut PATCH
leaves the bytes that arrived) and webjob.cgi under nginx + fcgiwrap (nginx
buffers the whole request body first, so a cut PATCH never reaches the CGI
and the upload resumes from the last whole PATCH).

Each site is the session's own (conftest); PartialUploadEnable is switched
on for these tests only and the partial folder removed afterwards.
"""

import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from conftest import NPH_WEBJOB, WEBJOB, write_file
from test_client_stream import ERR, OUT, PROGRAM, SEGMENT, Relay, run_held
from test_deploy_end_to_end import deployed_cfg

SEED = 2016
CUTS = 6                        # cut points per front end and kind
HEADS = 4096                    # bytes past the HEAD and PATCH heads


def reset(site):
    """Empty incoming/ (partials too), the log and the manifest, so verify
    sees this test's work only."""
    shutil.rmtree(os.path.join(site.root, 'incoming', '.partial'),
                  ignore_errors=True)
    site.clean()
    manifest = os.path.join(site.root, 'logfiles',
                            'nph-webjob-manifest.sha256')
    if os.path.exists(manifest):
        os.unlink(manifest)


def enable_partial(site):
    """Switch the extension on in the site's config; returns the undo."""
    with open(site.properties, 'rb') as handle:
        original = handle.read()
    write_file(site.properties, original + b'PartialUploadEnable = Y\n')
    write_file(os.path.join(site.root, 'profiles', 'client_1', 'commands',
                            'seq.sh'), PROGRAM, 0o755)

    reset(site)

    def undo():
        write_file(site.properties, original)
        reset(site)
    return undo


@pytest.fixture
def apache(apache_server):
    site = apache_server()
    undo = enable_partial(site)
    yield site
    undo()


@pytest.fixture
def nginx(nginx_server):
    undo = enable_partial(nginx_server)
    yield nginx_server
    undo()


def apache_cfg(tmp_path, site, put_url, mode):
    folder = tmp_path / 'job'
    folder.mkdir()
    path = tmp_path / 'job.cfg'
    write_file(str(path), (
        'ClientId=client_1\nURLGetURL=%s\nURLPutURL=%s\nTempDirectory=%s\n'
        'URLAuthType=basic\nURLUsername=client_1\nURLPassword=secret-1\n'
        'UploadMode=%s\nUploadSegmentSize=%d\nPutTimeLimit=120\n'
        % (site.cgi_url, put_url, folder, mode, SEGMENT)).encode())
    return str(path), str(folder)


def nginx_cfg(tmp_path, site, put_url, mode, pki):
    folder = tmp_path / 'job'
    folder.mkdir()
    path = deployed_cfg(tmp_path, site.cgi_url, folder, pki,
                        URLPutURL=put_url, UploadMode=mode,
                        UploadSegmentSize=SEGMENT, PutTimeLimit=120,
                        HashType='MD5')
    return path, str(folder)


def job_argv(cfg):
    return [sys.executable, WEBJOB, '-e', '-f', cfg, 'seq.sh']


def run(cfg):
    return subprocess.run(job_argv(cfg), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=300)


def assert_one_group(site, result):
    """One group in incoming/ (plus the partial folder), byte for byte the
    program's output; verify clean."""
    assert result.returncode == 0, result.stderr.decode()
    rdy = [n for n in site.incoming() if n.endswith('.rdy')]
    assert len(rdy) == 1, site.incoming()
    stem = os.path.join(site.root, 'incoming', rdy[0][:-4])
    for ext, data in (('out', OUT), ('err', ERR)):
        with open(stem + '.' + ext, 'rb') as handle:
            assert handle.read() == data, ext
    report = subprocess.run([sys.executable, NPH_WEBJOB, 'verify', '--root',
                             site.root], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=60)
    assert report.returncode == 0, report.stdout.decode()


def methods(site, count):
    return [line.split()[5] for line in site.log_lines(count)]




@pytest.mark.parametrize('mode', ['resumable', 'streamed'])
def test_apache_stores_a_job_uploaded_this_way(tmp_path, apache, mode):
    cfg, folder = apache_cfg(tmp_path, apache, apache.cgi_url, mode)
    assert_one_group(apache, run(cfg))
    assert 'PATCH' in methods(apache, 3)


def held_bytes(site):
    """Bytes of every stream held in incoming/.partial/ (0 when none)."""
    top = os.path.join(site.root, 'incoming', '.partial')
    total = 0
    for folder, _, names in os.walk(top):
        for name in names:
            if name in ('out', 'err', 'env'):
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
    return total


def wait_for_held_bytes(site, timeout=120.0):
    """Bytes the server holds in incoming/.partial/, once there are some
    (deadline loop on the file: the CGI appends what reaches it)."""
    deadline = time.monotonic() + timeout
    while True:
        held = held_bytes(site)
        if held or time.monotonic() > deadline:
            return held
        time.sleep(0.01)     # poll interval while waiting on the file


def logged_patches(site, statuses, count=1, timeout=60.0):
    """(ContentLength, ReturnStatus) of every PATCH in the site's log, in
    order, once at least count are and a PATCH with each of statuses is
    logged (deadline loop: a CGI writes its log line after it answered)."""
    deadline = time.monotonic() + timeout
    while True:
        patches = [(int(fields[8]), fields[11]) for fields in
                   (line.split() for line in site.log_lines())
                   if fields[5] == 'PATCH']
        if (len(patches) >= count and set(statuses) <= set(
                status for _, status in patches)) or \
                time.monotonic() > deadline:
            return patches
        time.sleep(0.01)     # poll interval while waiting on the log


@pytest.mark.parametrize('mode', ['resumable', 'streamed'])
def test_apache_resumes_after_cuts_at_random_offsets(tmp_path, apache, mode):
    """mod_cgi hands the CGI the body as it arrives: after a cut the server
    holds what came, and the PATCH that completes sends only the rest.

    The relay holds the upload at a random offset past the request heads,
    and cuts it only once the server's partial file has grown, so every
    trial cuts an upload the server holds part of (a cut at a byte offset
    alone raced the CGI's start-up)."""
    relay = Relay(apache.port)
    rand = random.Random('%s-%s' % (SEED, mode))
    try:
        for trial in range(CUTS):
            reset(apache)
            relay.arm(hold_at=rand.randrange(HEADS, len(OUT)))
            work = tmp_path / str(trial)
            work.mkdir()
            cfg, folder = apache_cfg(work, apache, relay.url, mode)
            holding = []

            def wait_until_held():
                holding.append(wait_for_held_bytes(apache))
                assert holding[0], 'the server never held any of the upload'
            assert_one_group(apache, run_held(relay, job_argv(cfg),
                                              wait_until_held))
            held = holding[0]
            if mode == 'resumable':
                # the cut PATCH declared the whole upload and was logged by
                # the CGI Apache ended: 456 (its body ended), or 500 when
                # the SIGTERM came after that; the one that completed it
                # declared only what the server did not hold
                patches = logged_patches(apache, ('200',), 2)
                cut = [length for length, status in patches
                       if status in ('456', '500')]
                rest = [length for length, status in patches
                        if status == '200']
                assert len(patches) == 2 and len(cut) == len(rest) == 1, (
                    trial, held, patches)
                assert rest[0] <= cut[0] - held, (trial, held, patches)
            else:
                assert len(logged_patches(apache, ('200',))) >= 2, trial
    finally:
        relay.close()


@pytest.mark.parametrize('mode', ['resumable', 'streamed'])
def test_nginx_stores_a_job_uploaded_this_way(tmp_path, nginx, pki, mode):
    cfg, folder = nginx_cfg(tmp_path, nginx, nginx.cgi_url, mode, pki)
    assert_one_group(nginx, run(cfg))
    assert 'PATCH' in methods(nginx, 3)


def test_nginx_never_hands_a_cut_patch_to_the_cgi(tmp_path, nginx, pki):
    """nginx buffers the request body: a PATCH cut half way is dropped by
    nginx, the CGI logs no short body (456), and the streamed upload resumes
    from the last whole segment; so the loss is at most UploadSegmentSize."""
    relay = Relay(nginx.port)
    rand = random.Random(SEED)
    try:
        for trial in range(CUTS):
            reset(nginx)
            relay.arm(cut=rand.randrange(SEGMENT, len(OUT)))
            work = tmp_path / str(trial)
            work.mkdir()
            cfg, folder = nginx_cfg(work, nginx,
                                    nginx.cgi_url.replace(
                                        ':%d/' % nginx.port,
                                        ':%s/' % relay.url.split(':')[2]
                                        .split('/')[0]), 'streamed', pki)
            assert_one_group(nginx, run(cfg))
            assert relay.cut is None, 'the cut point was never reached'
            lines = nginx.log_lines()
            assert not [line for line in lines if ' 456 ' in line], lines
    finally:
        relay.close()
