"""End to end: webjob.py against nph_webjob.py as real processes under every
Python, the standalone server with TLS and authentication, and the Apache
mod_ssl and nginx + fcgiwrap deployments.
"""

import base64
import hashlib
import os
import re
import socket
import subprocess
import sys

import pytest

from test_client import (CGI_PATH, assert_clean_error, gpg_home, gpg_sign,
                         job_dir, make_pad_bytes, reply, run_webjob,
                         write_cfg)
from test_dsv_get_stage import signer, small_signer


# End to end against nph_webjob.py ############################################

from conftest import OLDEST_PY, NEWEST_PY, PYTHONS  # noqa: E402


def server_cfg(tmp_path, url, job_dir, **extra):
    controls = dict(ClientId='client_1', URLGetURL=url, URLPutURL=url,
                    TempDirectory=str(job_dir), OverwriteExecutable='Y',
                    HashType='SHA256')
    controls.update(extra)
    return write_cfg(tmp_path, **controls)


def read_group(incoming, program='hostname.sh'):
    """The one upload group in incoming/, as {extension: bytes}."""
    names = sorted(n for n in os.listdir(str(incoming)) if n.endswith(
        '_' + program + '.rdy'))
    assert len(names) == 1, os.listdir(str(incoming))
    stem = os.path.join(str(incoming), names[0][:-len('.rdy')])
    assert re.match(r'client_1_\d{14}_\d{5}_%s\Z' % re.escape(program),
                    os.path.basename(stem))
    group = {}
    for ext in ('out', 'err', 'env', 'rdy'):
        with open('%s.%s' % (stem, ext), 'rb') as handle:
            group[ext] = handle.read()
    return group


def assert_evidence(group, out_contains=b''):
    env = dict(line.split('=', 1) for line in group['env'].decode().splitlines())
    assert group['rdy'] == ('Jid=%s\n' % env['Jid']).encode()
    assert re.match(r'server_1_\d+_\d{5}\Z', env['Jid'])
    assert env['StdOutHash'] == hashlib.sha256(group['out']).hexdigest()
    assert env['StdErrHash'] == hashlib.sha256(group['err']).hexdigest()
    assert out_contains in group['out']
    return env


@pytest.mark.parametrize('python', PYTHONS, ids=lambda p: p.split('/')[-3])
def test_job_end_to_end_under_every_python(tmp_path, job_dir, standalone_server,
                                           python):
    server = standalone_server(python=NEWEST_PY)
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir)
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh'], python=python)
    assert result.returncode == 0, result.stderr
    env = assert_evidence(read_group(os.path.join(str(server.root), 'incoming')),
                          b'hello from client_1')
    lines = server.log_lines(2)
    assert [line.split()[5] for line in lines] == ['GET', 'PUT']
    assert lines[0].split()[2] == lines[1].split()[2] == env['Jid']


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
def test_server_under_oldest_and_newest_python(tmp_path, job_dir,
                                               standalone_server, python):
    server = standalone_server(python=python)
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir)
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh'])
    assert result.returncode == 0, result.stderr
    assert_evidence(read_group(os.path.join(str(server.root), 'incoming')))


def test_common_profile_serves_every_client(tmp_path, job_dir, standalone_server):
    server = standalone_server()
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir)
    result = run_webjob(['-e', '-f', cfg, 'common.sh'])
    assert result.returncode == 0, result.stderr


def test_missing_program_is_a_404_get_failure(tmp_path, job_dir, standalone_server):
    server = standalone_server()
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir)
    result = run_webjob(['-e', '-f', cfg, 'absent.sh'])
    assert_clean_error(result, 8, 'Status = [404]')


def test_linktest_upload_is_discarded_by_the_server(tmp_path, job_dir,
                                                    standalone_server):
    server = standalone_server()
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir, RunType='linktest')
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh'])
    assert result.returncode == 0, result.stderr
    assert server.incoming() == []
    assert server.log_lines(2)[1].split()[11] == '251'


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
def test_job_end_to_end_under_apache(tmp_path, job_dir, apache_server, python):
    server = apache_server()
    server.clean()
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir, URLAuthType='basic',
                     URLUsername='client_1', URLPassword='secret-1')
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh'], python=python)
    assert result.returncode == 0, result.stderr
    env = assert_evidence(read_group(os.path.join(server.root, 'incoming')),
                          b'hello from client_1')
    lines = server.log_lines(2)
    assert [line.split()[2] for line in lines] == [env['Jid'], env['Jid']]
    assert [line.split()[3] for line in lines] == ['client_1', 'client_1']


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
def test_job_through_the_install_cgi_stub_under_apache(tmp_path, job_dir,
                                                       apache_server, python):
    """nph_webjob.py install-cgi: the recommended, pre-compiled CGI."""
    from conftest import STUB_CGI_PATH
    server = apache_server(python=python)
    server.clean()
    url = server.url.rstrip('/') + STUB_CGI_PATH
    cfg = server_cfg(tmp_path, url, job_dir, URLAuthType='basic',
                     URLUsername='client_1', URLPassword='secret-1')
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh'])
    assert result.returncode == 0, result.stderr
    assert_evidence(read_group(os.path.join(server.root, 'incoming')),
                    b'hello from client_1')
    assert [line.split()[11] for line in server.log_lines(2)] == ['200', '200']


def test_apache_refuses_a_wrong_password(tmp_path, job_dir, apache_server):
    server = apache_server()
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir, URLAuthType='basic',
                     URLUsername='client_1', URLPassword='wrong')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'hostname.sh']), 8,
                       'Status = [401]')


def test_apache_refuses_another_clients_identity(tmp_path, job_dir, apache_server):
    server = apache_server()
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir, URLAuthType='basic',
                     URLUsername='client_2', URLPassword='secret-2')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'hostname.sh']), 8,
                       'Status = [453]')


# DSV, GetHook and PaD end to end against nph_webjob.py #######################

def publish(server, files, client='client_1'):
    """Put files in the server's profiles/<client>/commands/."""
    commands = os.path.join(str(server.root), 'profiles', client, 'commands')
    for name, data in files.items():
        with open(os.path.join(commands, name), 'wb') as handle:
            handle.write(data)


def marked_program(tmp_path, words=b'hello'):
    """A program that leaves tmp_path/ran behind, so running is visible."""
    marker = tmp_path / 'ran'
    return (b'#!/bin/sh\ntouch %s\necho "%s $1"\n' % (str(marker).encode(),
                                                       words)), marker


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
@pytest.mark.parametrize('in_header', [True, False],
                         ids=['signature-header', 'signature-second-get'])
def test_signed_job_runs_against_the_server(tmp_path, job_dir, standalone_server,
                                            signer, small_signer, python,
                                            in_header):
    signer = small_signer if in_header else signer
    server = standalone_server()
    body, marker = marked_program(tmp_path)
    publish(server, {'job.sh': body, 'job.sh.sig': signer.sign(body)})
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir, DsvVerifySignature='Y',
                     DsvCertificateTree=str(signer.tree))
    result = run_webjob(['-e', '-f', cfg, 'job.sh', 'signed'], python=python)
    assert result.returncode == 0, result.stderr
    assert_evidence(read_group(os.path.join(str(server.root), 'incoming'),
                               'job.sh'), b'hello signed')
    expected = (['job.sh', 'job.sh'] if in_header else
                ['job.sh', 'job.sh.sig', 'job.sh'])
    # INFO: the PUT's line is written after its answer: wait for it
    requests = [line.split()[7] for line in server.log_lines(len(expected))]
    assert requests == expected


def test_payload_tampered_on_the_server_is_never_run(tmp_path, job_dir,
                                                     standalone_server, signer):
    server = standalone_server()
    body, marker = marked_program(tmp_path)
    evil, _ = marked_program(tmp_path, b'EVIL')
    publish(server, {'job.sh': evil, 'job.sh.sig': signer.sign(body)})
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir, DsvVerifySignature='Y',
                     DsvCertificateTree=str(signer.tree))
    result = run_webjob(['-e', '-f', cfg, 'job.sh'])
    assert_clean_error(result, 8, 'signature verification failed')
    assert not marker.exists()
    assert server.incoming() == [] and os.listdir(str(job_dir)) == []


def test_example6_gzip_hook_against_the_server(tmp_path, job_dir,
                                               standalone_server):
    server = standalone_server()
    body, marker = marked_program(tmp_path)
    publish(server, {'job.sh.gz': subprocess.run(
        ['gzip', '-c'], input=body, stdout=subprocess.PIPE, check=True).stdout})
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir, GetHookEnable='Y',
                     GetHookCommandLine='gzip -d %vp', GetHookStatus='0',
                     GetHookSuffix='.gz')
    result = run_webjob(['-e', '-f', cfg, 'job.sh', 'gz'])
    assert result.returncode == 0, result.stderr
    assert_evidence(read_group(os.path.join(str(server.root), 'incoming'),
                               'job.sh'), b'hello gz')
    assert [line.split()[7] for line in server.log_lines(2)] == \
        ['job.sh.gz', 'job.sh']


@pytest.mark.parametrize('tampered', [False, True], ids=['signed', 'tampered'])
def test_example7_gpg_hook_against_the_server(tmp_path, job_dir,
                                              standalone_server, gpg_home,
                                              tampered):
    server = standalone_server()
    body, marker = marked_program(tmp_path)
    signed = bytearray(gpg_sign(gpg_home, body))
    if tampered:
        signed[len(signed) // 2] ^= 0x01
    publish(server, {'job.sh.gpg': bytes(signed)})
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir, GetHookEnable='Y',
                     GetHookCommandLine='gpg --batch --decrypt %vp > %tp',
                     GetHookStatus='0', GetHookSuffix='.gpg')
    result = run_webjob(['-e', '-f', cfg, 'job.sh', 'gpg'],
                        env={'GNUPGHOME': gpg_home['GNUPGHOME']})
    if tampered:    # gpg's own complaint comes first on stderr
        assert result.returncode == 8
        assert 'GetHookStatus' in result.stderr.decode().splitlines()[-1]
        assert not marker.exists() and server.incoming() == []
    else:
        assert result.returncode == 0, result.stderr
        assert_evidence(read_group(os.path.join(str(server.root), 'incoming'),
                                   'job.sh'), b'hello gpg')


def test_pad_job_against_the_server(tmp_path, job_dir, standalone_server):
    server = standalone_server()
    data = bytes(range(256)) * 4099
    publish(server, {'blob.bin.pad': make_pad_bytes(tmp_path, 'blob.bin', data)})
    cfg = server_cfg(tmp_path, server.cgi_url, job_dir)
    result = run_webjob(['-e', '-f', cfg, 'blob.bin.pad', 'sha256sum',
                         '%payload'])
    assert result.returncode == 0, result.stderr
    group = read_group(os.path.join(str(server.root), 'incoming'),
                       'blob.bin.pad')
    assert_evidence(group, ('%s  blob.bin\n' % hashlib.sha256(data).hexdigest())
                    .encode())


# End to end: the standalone server with TLS and authentication ###############

def htpasswd_file(folder, *entries):
    path = os.path.join(str(folder), 'htpasswd')
    open(path, 'w').close()
    for flag, user, password in entries:
        subprocess.run(['htpasswd', '-b', flag, path, user, password], check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return path


@pytest.fixture
def tls_standalone(standalone_server, pki, tmp_path):
    passwords = htpasswd_file(tmp_path, ('-m', 'client_1', 'access'),
                              ('-s', 'client_2', 'other'),
                              ('-B', 'client_3', 'bcrypt'))
    return standalone_server(args=['--tls-cert', pki.path('server.crt'),
                                   '--tls-key', pki.path('server.key'),
                                   '--client-ca', pki.path('ca.crt'),
                                   '--htpasswd', passwords])


def secure_cfg(tmp_path, server, job_dir, pki, **extra):
    url = 'https://127.0.0.1:%d%s' % (server.port, CGI_PATH)
    controls = dict(SSLVerifyPeerCert='Y', SSLBundledCAsFile=pki.path('ca.crt'),
                    SSLExpectedPeerCN='webjob.test', SSLUseCertificate='Y',
                    SSLPublicCertFile=pki.path('client.crt'),
                    SSLPrivateKeyFile=pki.path('client-encrypted.key'),
                    SSLPassPhrase='flimflam', URLAuthType='basic',
                    URLUsername='client_1', URLPassword='access')
    controls.update(extra)
    return server_cfg(tmp_path, url, job_dir, **controls)


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
def test_job_over_tls_with_client_certificate_and_password(
        tmp_path, job_dir, tls_standalone, pki, python):
    cfg = secure_cfg(tmp_path, tls_standalone, job_dir, pki)
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh'], python=python)
    assert result.returncode == 0, result.stderr
    assert_evidence(read_group(os.path.join(str(tls_standalone.root), 'incoming')))
    assert tls_standalone.log_lines(2)[0].split()[3] == 'client_1'


def test_wrong_password_gets_401(tmp_path, job_dir, tls_standalone, pki):
    cfg = secure_cfg(tmp_path, tls_standalone, job_dir, pki, URLPassword='nope')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'hostname.sh']), 8,
                       'Status = [401]')
    assert 'wrong or unknown credentials' in tls_standalone.log_lines(1)[0]


def test_unsupported_htpasswd_entry_is_refused_and_logged(tmp_path, job_dir,
                                                          tls_standalone, pki):
    cfg = secure_cfg(tmp_path, tls_standalone, job_dir, pki, ClientId='client_3',
                     URLUsername='client_3', URLPassword='bcrypt')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'hostname.sh']), 8,
                       'Status = [401]')
    assert 'cannot be checked (bcrypt)' in tls_standalone.log_lines(1)[0]


def test_basic_user_must_match_the_certificate(tmp_path, job_dir, tls_standalone,
                                               pki):
    cfg = secure_cfg(tmp_path, tls_standalone, job_dir, pki,
                     URLUsername='client_2', URLPassword='other')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'hostname.sh']), 8,
                       'Status = [401]')


def test_certificate_cn_must_match_the_client_id(tmp_path, job_dir,
                                                 standalone_server, pki):
    server = standalone_server(args=['--tls-cert', pki.path('server.crt'),
                                     '--tls-key', pki.path('server.key'),
                                     '--client-ca', pki.path('ca.crt')])
    cfg = secure_cfg(tmp_path, server, job_dir, pki, ClientId='client_2',
                     URLAuthType='none')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'hostname.sh']), 8,
                       'Status = [453]')


def test_client_without_certificate_is_refused(tmp_path, job_dir, tls_standalone,
                                               pki):
    cfg = secure_cfg(tmp_path, tls_standalone, job_dir, pki,
                     SSLUseCertificate='N')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'hostname.sh']), 8,
                       'GetStage')


@pytest.mark.parametrize('args', [[], ['--htpasswd', '/dev/null']])
def test_non_loopback_bind_needs_tls_and_authentication(tmp_path, args):
    from conftest import NPH_WEBJOB
    result = subprocess.run([sys.executable, NPH_WEBJOB, 'serve', '--root',
                             str(tmp_path / 'r'), '--bind', '0.0.0.0', '--port',
                             '0'] + args, stderr=subprocess.PIPE, timeout=30)
    assert result.returncode == 1
    assert b'refusing to listen on 0.0.0.0 without TLS and authentication' \
        in result.stderr


# Deployments: Apache mod_ssl and nginx + fcgiwrap ############################
# One Apache (conftest.apache_tls_server: a plain port and four mod_ssl vhosts)
# and one nginx + fcgiwrap (conftest.nginx_server) serve the whole session;
# last, the standalone TLS server on the oldest and the newest Python.  The
# TLS handshake timeout is pinned against a silent socket above
# (test_get_time_limit_bounds_the_tls_handshake): no web server is needed.

from conftest import PARSED_CGI_PATH  # noqa: E402


def deployed_cfg(tmp_path, url, job_dir, pki, **extra):
    """A job config with every SSL control on, as client_1 (certificate and
    Basic auth password secret-1) against a web server's CGI URL."""
    controls = dict(SSLVerifyPeerCert='Y',
                    SSLBundledCAsFile=pki.path('ca.crt'),
                    SSLExpectedPeerCN='webjob.test', SSLMaxChainLength='1',
                    SSLUseCertificate='Y',
                    SSLPublicCertFile=pki.path('client.crt'),
                    SSLPrivateKeyFile=pki.path('client-encrypted.key'),
                    SSLPassPhrase='flimflam', URLAuthType='basic',
                    URLUsername='client_1', URLPassword='secret-1')
    controls.update(extra)
    return server_cfg(tmp_path, url, job_dir, **controls)


def assert_nothing_reached_the_cgi(server, job_dir):
    """The request died before the CGI: no program, no log, no upload."""
    assert not os.path.exists(str(job_dir / 'hostname.sh'))
    assert server.log_lines() == []
    assert server.incoming() == []


@pytest.fixture
def apache_tls(apache_tls_server):
    """The session's mod_ssl Apache, its incoming/ and log emptied."""
    apache_tls_server.clean()
    return apache_tls_server


@pytest.fixture
def nginx(nginx_server):
    """The session's nginx + fcgiwrap, its incoming/ and log emptied."""
    nginx_server.clean()
    return nginx_server


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
def test_job_through_apache_mod_ssl_with_every_ssl_control(
        tmp_path, job_dir, apache_tls, pki, python):
    cfg = deployed_cfg(tmp_path, apache_tls.https_url(), job_dir, pki)
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh', 'tls'], python=python)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b''
    group = read_group(os.path.join(apache_tls.root, 'incoming'))
    env = assert_evidence(group, b'hello from client_1 tls')
    lines = apache_tls.log_lines(2)
    assert [line.split()[2] for line in lines] == [env['Jid'], env['Jid']]
    assert [line.split()[3] for line in lines] == ['client_1', 'client_1']


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
def test_apache_chain_through_an_intermediate_passes_with_max_chain_length_2(
        tmp_path, job_dir, apache_tls, pki, python):
    cfg = deployed_cfg(tmp_path, apache_tls.https_url('via-inter'), job_dir,
                       pki, SSLMaxChainLength='2')
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh'], python=python)
    assert result.returncode == 0, result.stderr
    assert_evidence(read_group(os.path.join(apache_tls.root, 'incoming')))


def test_apache_certificate_cn_is_the_user_without_basic_auth(
        tmp_path, job_dir, apache_tls, pki):
    """/cgi-cert/ has SSLVerifyClient require and no Basic auth: the CGI
    takes the user from the CN mod_ssl passes (SSL_CLIENT_S_DN_CN)."""
    cfg = deployed_cfg(tmp_path, apache_tls.https_url(path='/cgi-cert/nph-'
                                                      'webjob.cgi'),
                       job_dir, pki, URLAuthType='none')
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh'])
    assert result.returncode == 0, result.stderr
    assert_evidence(read_group(os.path.join(apache_tls.root, 'incoming')))
    assert [line.split()[3] for line in apache_tls.log_lines(2)] == \
        ['client_1', 'client_1']


def test_apache_certificate_cn_of_another_client_is_453(tmp_path, job_dir,
                                                        apache_tls, pki):
    cfg = deployed_cfg(tmp_path, apache_tls.https_url(path='/cgi-cert/nph-'
                                                      'webjob.cgi'),
                       job_dir, pki, URLAuthType='none', ClientId='client_2')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'hostname.sh']), 8,
                       'Status = [453]')


APACHE_TLS_FAILURES = [
    ('unknown-ca', 'main', {'SSLBundledCAsFile': 'rogue-ca.crt'},
     ['certificate verify failed']),
    ('expected-cn-differs', 'main', {'SSLExpectedPeerCN': 'other.test'},
     ['SSLExpectedPeerCN', 'webjob.test']),
    ('server-cn-differs', 'wrong-cn', {}, ['SSLExpectedPeerCN', 'other.test']),
    ('chain-too-long', 'via-inter', {}, ['SSLMaxChainLength is 1']),
    ('expired', 'expired', {}, ['expired']),
    ('no-client-certificate', 'main', {'SSLUseCertificate': 'N'},
     ['alert certificate required']),
    ('rogue-client-certificate', 'main',
     {'SSLPublicCertFile': 'client-rogue.crt',
      'SSLPrivateKeyFile': 'client-rogue.key'}, ['alert unknown ca']),
]


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
@pytest.mark.parametrize('vhost,controls,words',
                         [case[1:] for case in APACHE_TLS_FAILURES],
                         ids=[case[0] for case in APACHE_TLS_FAILURES])
def test_apache_tls_failure_fails_the_get_stage(tmp_path, job_dir, apache_tls,
                                                pki, python, vhost, controls,
                                                words):
    controls = dict((name, pki.path(value) if name.endswith('File') else value)
                    for name, value in controls.items())
    cfg = deployed_cfg(tmp_path, apache_tls.https_url(vhost), job_dir, pki,
                       **controls)
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh'], python=python)
    assert_clean_error(result, 8, 'GetStage', *words)
    assert_nothing_reached_the_cgi(apache_tls, job_dir)


def test_apache_refuses_a_basic_user_other_than_the_certificate_cn(
        tmp_path, job_dir, apache_tls, pki):
    """Require expr: client_2's password with client_1's certificate is
    refused with a 401 (AuthzSendForbiddenOnFailure Off), though
    RequireMatch alone would let client_2 in."""
    cfg = deployed_cfg(tmp_path, apache_tls.https_url(), job_dir, pki,
                       ClientId='client_2', URLUsername='client_2',
                       URLPassword='secret-2')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'hostname.sh']), 8,
                       'Status = [401]')
    assert_nothing_reached_the_cgi(apache_tls, job_dir)


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
def test_job_through_nginx_and_fcgiwrap_in_parsed_header_mode(
        tmp_path, job_dir, nginx, pki, python):
    cfg = deployed_cfg(tmp_path, nginx.cgi_url, job_dir, pki)
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh', 'fcgi'],
                        python=python)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b''
    env = assert_evidence(read_group(os.path.join(nginx.root, 'incoming')),
                          b'hello from client_1 fcgi')
    lines = nginx.log_lines(2)
    assert [line.split()[2] for line in lines] == [env['Jid'], env['Jid']]
    assert [line.split()[3] for line in lines] == ['client_1', 'client_1']


def test_nginx_passes_a_custom_status_and_its_reason_through(
        tmp_path, job_dir, nginx, pki):
    cfg = deployed_cfg(tmp_path, nginx.cgi_url + '?EXTRA=1', job_dir, pki)
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh'])
    assert_clean_error(result, 8, 'GetStage',
                       'Status = [450], Reason = [Invalid Query]')
    assert nginx.log_lines(1)[0].split()[11] == '450'


def test_nginx_keeps_the_cgi_content_length(nginx, pki):
    """The client requires Content-Length: nginx must not rechunk."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.path('ca.crt'))
    context.load_cert_chain(pki.path('client.crt'), pki.path('client.key'))
    query = ('VERSION=webjob-1.9.0&SYSTEM=Linux&CLIENTID=client_1'
             '&FILENAME=hostname.sh&RUNTYPE=snapshot')
    request = ('GET %s?%s HTTP/1.1\r\nHost: webjob.test\r\n'
               'Authorization: Basic %s\r\nConnection: close\r\n\r\n' % (
                   PARSED_CGI_PATH, query,
                   base64.b64encode(b'client_1:secret-1').decode()))
    with socket.create_connection(('127.0.0.1', nginx.port), 10) as raw:
        with context.wrap_socket(raw, server_hostname='webjob.test') as sock:
            sock.sendall(request.encode())
            reply = b''.join(iter(lambda: sock.recv(65536), b''))
    head, body = reply.split(b'\r\n\r\n', 1)
    fields = head.decode().lower().split('\r\n')
    assert fields[0] == 'http/1.1 200 ok'
    assert 'content-length: %d' % len(body) in fields
    assert not any(f.startswith('transfer-encoding') for f in fields)
    assert body == b'#!/bin/sh\necho "hello from client_1 $*"\n'


def test_nginx_answers_400_to_a_client_without_a_certificate(
        tmp_path, job_dir, nginx, pki):
    """ssl_verify_client on: nginx completes the handshake and refuses with
    a 400, where Apache's SSLVerifyClient require aborts the handshake."""
    cfg = deployed_cfg(tmp_path, nginx.cgi_url, job_dir, pki,
                       SSLUseCertificate='N')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'hostname.sh']), 8,
                       'Status = [400]')
    assert_nothing_reached_the_cgi(nginx, job_dir)


def test_nginx_refuses_a_wrong_password(tmp_path, job_dir, nginx, pki):
    cfg = deployed_cfg(tmp_path, nginx.cgi_url, job_dir, pki,
                       URLPassword='wrong')
    assert_clean_error(run_webjob(['-e', '-f', cfg, 'hostname.sh']), 8,
                       'Status = [401]')
    assert_nothing_reached_the_cgi(nginx, job_dir)


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
def test_tls_standalone_server_under_oldest_and_newest_python(
        tmp_path, job_dir, standalone_server, pki, python):
    """The e2e tests above run the TLS server on the test runner's Python;
    here the server itself runs on the oldest and the newest."""
    passwords = htpasswd_file(tmp_path, ('-m', 'client_1', 'secret-1'))
    server = standalone_server(python=python, args=[
        '--tls-cert', pki.path('server-chain.pem'),
        '--tls-key', pki.path('server.key'), '--client-ca', pki.path('ca.crt'),
        '--htpasswd', passwords])
    url = 'https://127.0.0.1:%d%s' % (server.port, CGI_PATH)
    cfg = deployed_cfg(tmp_path, url, job_dir, pki)
    result = run_webjob(['-e', '-f', cfg, 'hostname.sh'], python=python)
    assert result.returncode == 0, result.stderr
    assert_evidence(read_group(os.path.join(str(server.root), 'incoming')))
    users = [line.split()[3] for line in server.log_lines(2)]
    assert users == ['client_1', 'client_1']
