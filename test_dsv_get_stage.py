"""DSV in the GET stage: signatures are checked before a program may run,
against a scripted loopback server.
"""

import base64
import os
import subprocess
import sys
import shutil
import types

import pytest

from test_client import (HERE, PROGRAM_BODY, assert_clean_error,
                         assert_get_failed_and_nothing_ran, basic_cfg,
                         job_dir, run_webjob, scripted)


# DSV in the GET stage ########################################################

def run_dsvtool(args):
    """The signing tool, which lives in the server: nph_webjob.py dsvtool."""
    return subprocess.run([sys.executable, os.path.join(HERE, 'nph_webjob.py'),
                           'dsvtool'] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120)


def make_signer(folder, bits):
    """A signing key and its certificate tree, made by our own dsvtool."""
    tree = folder / 'tree'
    tree.mkdir()
    result = run_dsvtool(['-g', '-b', str(bits), '-t', 'rsa', '-o',
                          str(folder / 'dsv')])
    assert result.returncode == 0, result.stderr
    shutil.copy(str(folder / 'dsv.crt'), str(tree / 'dsv.pem'))
    (tree / 'junk.txt').write_text('not a certificate\n')

    def sign(data, name='payload'):
        path = folder / name
        path.write_bytes(data)
        out = run_dsvtool(['-s', '-k', str(folder / 'dsv.key'), str(path)])
        assert out.returncode == 0, out.stderr
        return (folder / (name + '.sig')).read_bytes()
    return types.SimpleNamespace(tree=tree, sign=sign, folder=folder)


@pytest.fixture(scope='module')
def signer(tmp_path_factory):
    """RSA-2048: its 344-character signature never fits the header."""
    return make_signer(tmp_path_factory.mktemp('signer'), 2048)


@pytest.fixture(scope='module')
def small_signer(tmp_path_factory):
    """RSA-1024: its 172-character signature fits the 255-character header."""
    return make_signer(tmp_path_factory.mktemp('small-signer'), 1024)


def serve_signed(server, files, header=True):
    """Serve files; a '.sig' entry goes in the header or answers a 2nd GET."""
    def respond(request):
        name = dict(request.params()).get('FILENAME')
        if name not in files:
            return b'HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n'
        extra = b''
        if header and (name + '.sig') in files and \
                len(files[name + '.sig'].strip()) <= 255:
            extra = b'WebJob-Payload-Signature: ' + files[name + '.sig'].strip() \
                + b'\r\n'
        return (b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n'
                % (len(files[name]), extra) + files[name])
    server.respond = respond


def dsv_cfg(tmp_path, server, job_dir, tree, **extra):
    return basic_cfg(tmp_path, server, job_dir, put=False,
                     DsvVerifySignature='Y', DsvCertificateTree=str(tree), **extra)


@pytest.mark.parametrize('header', [True, False])
def test_signed_payload_runs(tmp_path, scripted, job_dir, signer, small_signer,
                             header):
    signer = small_signer if header else signer
    serve_signed(scripted, {'job.sh': PROGRAM_BODY,
                            'job.sh.sig': signer.sign(PROGRAM_BODY)}, header)
    cfg = dsv_cfg(tmp_path, scripted, job_dir, signer.tree)
    result = run_webjob(['-e', '-f', cfg, 'job.sh', 'signed'])
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'hello signed\n'
    names = [dict(r.params())['FILENAME'] for r in scripted.requests]
    assert names == (['job.sh'] if header else ['job.sh', 'job.sh.sig'])


def test_tampered_payload_is_refused_and_deleted(tmp_path, scripted, job_dir,
                                                 signer):
    evil = PROGRAM_BODY.replace(b'hello', b'EVIL!')
    serve_signed(scripted, {'job.sh': evil, 'job.sh.sig': signer.sign(PROGRAM_BODY)})
    cfg = dsv_cfg(tmp_path, scripted, job_dir, signer.tree)
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_clean_error(result, 8, 'signature verification failed')
    assert result.stdout == b'' and os.listdir(str(job_dir)) == []


def test_tampered_signature_is_refused(tmp_path, scripted, job_dir, signer):
    sig = bytearray(base64.b64decode(signer.sign(PROGRAM_BODY)))
    sig[10] ^= 1
    serve_signed(scripted, {'job.sh': PROGRAM_BODY,
                            'job.sh.sig': base64.b64encode(bytes(sig))})
    cfg = dsv_cfg(tmp_path, scripted, job_dir, signer.tree)
    assert_get_failed_and_nothing_ran(run_webjob(['-e', '-f', cfg, 'job.sh']),
                                      job_dir, 'signature')


def test_unsigned_payload_is_refused(tmp_path, scripted, job_dir, signer):
    serve_signed(scripted, {'job.sh': PROGRAM_BODY})
    cfg = dsv_cfg(tmp_path, scripted, job_dir, signer.tree)
    assert_get_failed_and_nothing_ran(run_webjob(['-e', '-f', cfg, 'job.sh']),
                                      job_dir, '.sig request failed')


def test_payload_signed_by_another_key_is_refused(tmp_path, scripted, job_dir,
                                                  signer, pki):
    other = tmp_path / 'other'
    other.mkdir()
    shutil.copy(pki.path('ca.crt'), str(other / 'ca.pem'))
    serve_signed(scripted, {'job.sh': PROGRAM_BODY,
                            'job.sh.sig': signer.sign(PROGRAM_BODY)})
    cfg = dsv_cfg(tmp_path, scripted, job_dir, other)
    assert_get_failed_and_nothing_ran(run_webjob(['-e', '-f', cfg, 'job.sh']),
                                      job_dir, 'signature')


@pytest.mark.parametrize('contents', [{}, {'junk.pem': 'garbage\n'}])
def test_tree_without_a_valid_certificate_is_a_configure_error(
        tmp_path, scripted, job_dir, contents):
    tree = tmp_path / 'tree'
    tree.mkdir()
    for name, text in contents.items():
        (tree / name).write_text(text)
    cfg = dsv_cfg(tmp_path, scripted, job_dir, tree)
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'job.sh']), 7,
                       'DsvCertificateTree')
    assert scripted.requests == []


def test_missing_tree_is_a_configure_error(tmp_path, scripted, job_dir):
    cfg = dsv_cfg(tmp_path, scripted, job_dir, tmp_path / 'absent')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'job.sh']), 7,
                       'DsvCertificateTree')


def test_sha1_signature_needs_dsv_allow_sha1(tmp_path, scripted, job_dir, signer):
    payload = signer.folder / 'sha1-payload'
    payload.write_bytes(PROGRAM_BODY)
    raw = subprocess.run(['openssl', 'dgst', '-sha1', '-sign',
                          str(signer.folder / 'dsv.key'), str(payload)],
                         stdout=subprocess.PIPE, check=True).stdout
    serve_signed(scripted, {'job.sh': PROGRAM_BODY,
                            'job.sh.sig': base64.b64encode(raw)})
    cfg = dsv_cfg(tmp_path, scripted, job_dir, signer.tree)
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 8
    cfg = dsv_cfg(tmp_path, scripted, job_dir, signer.tree, DsvAllowSHA1='Y')
    assert run_webjob(['-e', '-f', cfg, 'job.sh']).returncode == 0
