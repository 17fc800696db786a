"""The messages a responder meets at 3 a.m. say what to do next (issue 12).

Each test provokes one failure for real (a server, a certificate, a mount,
a locale, a full disk) and checks the one line the client prints and the
exit code the README's table gives.
"""

import os
import subprocess
import sys

import pytest

import webjob
from conftest import NEWEST_PY, OLDEST_PY
from test_client import (WEBJOB, ScriptedServer, assert_clean_error,
                         basic_cfg, job_dir, output_files, reply, run_webjob,
                         scripted, tls_cfg)

PYTHONS = pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                                  ids=['oldest', 'newest'])


def test_401_without_credentials_says_none_were_sent(tmp_path, scripted,
                                                     job_dir):
    scripted.respond = reply(b'401 Unauthorized', b'Content-Length: 0\r\n')
    result = run_webjob(['-e', '-f', basic_cfg(tmp_path, scripted, job_dir),
                         'job.sh'])
    assert_clean_error(result, 8, 'Status = [401]', 'no credentials were sent',
                       'URLAuthType=basic')


def test_401_with_credentials_says_they_were_refused(tmp_path, scripted,
                                                     job_dir):
    scripted.respond = reply(b'401 Unauthorized', b'Content-Length: 0\r\n')
    cfg = basic_cfg(tmp_path, scripted, job_dir, URLAuthType='basic',
                    URLUsername='client_1', URLPassword='not-it')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'job.sh']), 8,
                       'Status = [401]', 'sent and refused', 'URLPassword')


def test_nginx_400_reason_comes_from_its_page(nginx_server):
    # Plain http to nginx's https port: nginx says why only in the body.
    url = 'http://127.0.0.1:%d/cgi-client/webjob.cgi' % nginx_server.port
    result = run_webjob(['-g', url])
    assert_clean_error(result, 8, 'Status = [400]', 'the server says: The '
                       'plain HTTP request was sent to HTTPS port')


def test_server_that_closes_without_answering_points_at_the_cgi(
        tmp_path, scripted, job_dir):
    scripted.respond = lambda request: None     # closed, not a byte sent
    result = run_webjob(['-e', '-f', basic_cfg(tmp_path, scripted, job_dir),
                         'job.sh'])
    assert_clean_error(result, 8, 'without answering', 'CGI', 'error log')


def test_noexec_temp_directory_is_named_with_the_next_step(tmp_path, scripted,
                                                           job_dir):
    mount = tmp_path / 'noexec'
    mount.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'noexec,size=4m', 'tmpfs',
                    str(mount)], check=True)
    try:
        cfg = basic_cfg(tmp_path, scripted, job_dir, TempDirectory=str(mount))
        result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    finally:
        subprocess.run(['umount', str(mount)], check=True)
    assert_clean_error(result, 9, 'RunStage', 'mounted noexec',
                       'TempDirectory = [%s]' % mount)


def test_failed_put_says_where_the_outputs_are_kept(tmp_path, scripted,
                                                    job_dir):
    scripted.respond = lambda request: (
        scripted.default_response(request) if request.method == 'GET' else
        b'HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n')
    result = run_webjob(['-e', '-f', basic_cfg(tmp_path, scripted, job_dir),
                         'job.sh'])
    assert_clean_error(result, 10, 'Status = [500]')
    err = result.stderr.decode()
    assert 'the output files are kept in %s' % job_dir in err
    for suffix in ('out', 'err', 'env'):
        name, = output_files(job_dir, suffix)
        assert name in err


def run_against_certificate(tmp_path, pki, job_dir, python, certificate):
    """A verifying job against a scripted HTTPS server using certificate."""
    server = ScriptedServer()
    server.tls = pki.server_context(certificate)
    try:
        cfg = tls_cfg(tmp_path, server, job_dir, pki)
        return run_webjob(['-e', '-f', cfg, 'job.sh'], python=python)
    finally:
        server.close()


@PYTHONS
def test_unknown_ca_names_the_bundle(tmp_path, pki, job_dir, python):
    result = run_against_certificate(tmp_path, pki, job_dir, python,
                                     'server-rogue')
    assert_clean_error(result, 8, 'certificate verify failed',
                       'SSLBundledCAsFile = [%s]' % pki.path('ca.crt'))


@PYTHONS
def test_expired_certificate_says_whose_and_the_local_clock(tmp_path, pki,
                                                            job_dir, python):
    result = run_against_certificate(tmp_path, pki, job_dir, python,
                                     'server-expired')
    assert_clean_error(result, 8, 'certificate has expired',
                       "the server's certificate [CN=webjob.test] expired "
                       '2001-01-01 00:00:00 UTC', "this host's clock says")


def test_non_ascii_temp_directory_under_lang_c_on_the_oldest_python(
        tmp_path, scripted):
    temp = tmp_path / 't\u00e9mp'
    temp.mkdir()
    cfg = tmp_path / 'c.cfg'
    cfg.write_bytes(('ClientId=client_1\nURLGetURL=%s\nTempDirectory=%s\n'
                     % (scripted.url(), temp)).encode('utf-8'))
    result = run_webjob(['-e', '-f', str(cfg), 'job.sh'], python=OLDEST_PY,
                        env={'LANG': 'C', 'LC_ALL': 'C'})
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'hello \n'
    assert (temp / 'job.sh').exists()


@pytest.mark.parametrize('argv, code', [
    (['-v'], webjob.XER_ABORT),
    (['-h', '-t', 'md5', WEBJOB], webjob.XER_ABORT),
    (['-g', 'URL'], webjob.XER_GET_STAGE),
])
def test_output_to_a_full_disk_is_one_clear_line(scripted, argv, code):
    argv = [scripted.url() if arg == 'URL' else arg for arg in argv]
    with open('/dev/full', 'wb') as full:
        result = subprocess.run([sys.executable, '-I', '-S', WEBJOB] + argv,
                                stdout=full, stderr=subprocess.PIPE,
                                timeout=60)
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert err == 'webjob: stdout: No space left on device\n' or (
        code == 8 and err.startswith('webjob: ') and err.count('\n') == 1
        and 'No space left on device' in err), err


def test_started_without_isolation_under_pythonpath_warns_once(tmp_path):
    result = run_webjob(['-v'], env={'PYTHONPATH': str(tmp_path)})
    assert result.returncode == 0
    assert result.stderr.decode() == (
        'webjob: warning: started without isolation while PYTHONPATH is in '
        'effect: code from there may have run before webjob; start it as '
        'python3 -I -S webjob.py\n')


def test_a_user_site_in_effect_is_warned_about(tmp_path):
    version = 'python%d.%d' % sys.version_info[:2]
    (tmp_path / '.local' / 'lib' / version / 'site-packages').mkdir(
        parents=True)
    result = run_webjob(['-v'], env={'HOME': str(tmp_path)})
    assert result.returncode == 0
    assert 'warning: started without isolation while the user site' in \
        result.stderr.decode()


def test_isolated_start_does_not_warn_and_ignores_a_planted_module(tmp_path):
    (tmp_path / 'sitecustomize.py').write_text(
        'import sys; sys.stderr.write("PLANTED\\n")\n')
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    planted = subprocess.run([sys.executable, WEBJOB, '-v'], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    isolated = subprocess.run([sys.executable, '-I', '-S', WEBJOB, '-v'],
                              env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert b'PLANTED' in planted.stderr and b'warning' in planted.stderr
    assert isolated.stderr == b'' and isolated.returncode == 0


def test_sample_config_teaches_the_isolated_form():
    with open(os.path.join(os.path.dirname(WEBJOB), 'sample.cfg')) as handle:
        text = handle.read()
    assert 'python3 -I -S webjob.py -e -f' in text
    assert 'python3 webjob.py' not in text
