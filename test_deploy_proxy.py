"""Jobs through a real Squid on loopback (README, "Proxies"): plain HTTP,
HTTPS by CONNECT, Basic proxy authentication, a proxy that refuses, one
that drops mid-transfer, and the host's proxy variables, which count only
with ProxyUseEnvironment=Y.  Then re-send recognition under Apache and
nginx + fcgiwrap.
"""

import os
import subprocess
import sys

import pytest

from conftest import (CGI_PATH, LOOPBACK, NEWEST_PY, OLDEST_PY, WEBJOB,
                      FaultPlan, free_port)

USERS = (('responder', 'proxy-secret'),)


def run_webjob(args, stdin=None, env=None, python=None):
    return subprocess.run([python or sys.executable, WEBJOB] + list(args),
                          input=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, timeout=120)


def config(url, temp, **controls):
    lines = ['ClientId=client_1', 'URLGetURL=%s' % url, 'URLPutURL=%s' % url,
             'TempDirectory=%s' % temp]
    lines += ['%s=%s' % pair for pair in sorted(controls.items())]
    return ('\n'.join(lines) + '\n').encode()


def tls_controls(pki):
    return dict(SSLVerifyPeerCert='Y', SSLBundledCAsFile=pki.path('ca.crt'),
                SSLExpectedPeerCN='webjob.test')


def stored(server):
    return [name for name in server.incoming() if name.endswith('.rdy')]


@pytest.fixture
def temp(tmp_path):
    path = tmp_path / 'temp'
    path.mkdir()
    return path


@pytest.fixture
def tls_server(standalone_server, pki):
    return standalone_server(args=['--tls-cert', pki.path('server-chain.pem'),
                                   '--tls-key', pki.path('server.key')])


def test_http_job_goes_through_squid(standalone_server, squid_proxy, temp):
    server, squid = standalone_server(), squid_proxy()
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], config(
        server.cgi_url, temp, ProxyURL=squid.url()))
    assert result.returncode == 0, result.stderr
    assert len(stored(server)) == 1
    assert [line.split()[5:7] for line in squid.access_lines(2)] == [
        ['GET', server.cgi_url + '?'], ['PUT', server.cgi_url + '?']]


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY],
                         ids=lambda p: p.split('/')[-3])
def test_https_job_tunnels_through_squid_with_connect(tls_server, squid_proxy,
                                                      pki, temp, python):
    squid = squid_proxy()
    url = 'https://%s:%d%s' % (LOOPBACK, tls_server.port, CGI_PATH)
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], config(
        url, temp, ProxyURL=squid.url(), **tls_controls(pki)), python=python)
    assert result.returncode == 0, result.stderr
    assert len(stored(tls_server)) == 1
    # Pythons before 3.10 add a probe handshake (SSLMaxChainLength): it
    # goes through the tunnel too.
    methods = [line.split()[5:7] for line in squid.access_lines(2)]
    assert methods == [['CONNECT', '%s:%d' % (LOOPBACK, tls_server.port)]] * (
        3 if python == OLDEST_PY else 2)


@pytest.mark.parametrize('scheme', ['http', 'https'])
def test_basic_proxy_authentication(standalone_server, tls_server,
                                    squid_proxy, pki, temp, scheme):
    server = tls_server if scheme == 'https' else standalone_server()
    squid = squid_proxy(users=USERS)
    url = '%s://%s:%d%s' % (scheme, LOOPBACK, server.port, CGI_PATH)
    extra = tls_controls(pki) if scheme == 'https' else {}
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], config(
        url, temp, ProxyURL=squid.url(), ProxyAuthType='basic',
        ProxyUsername='responder', ProxyPassword='proxy-secret', **extra))
    assert result.returncode == 0, result.stderr
    assert b'proxy-secret' not in result.stderr
    assert len(stored(server)) == 1
    assert all(' responder ' in line for line in squid.access_lines(2))


def test_https_without_proxy_credentials_names_the_controls(
        tls_server, squid_proxy, pki, temp):
    squid = squid_proxy(users=USERS)
    url = 'https://%s:%d%s' % (LOOPBACK, tls_server.port, CGI_PATH)
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], config(
        url, temp, ProxyURL=squid.url(), PutRetryCount=3, PutRetryDelay=0,
        **tls_controls(pki)))
    err = result.stderr.decode()
    assert result.returncode == 8, err
    assert 'Status = [407]' in err and 'ProxyAuthType=basic' in err
    assert tls_server.log_lines() == []


def test_http_with_a_wrong_proxy_password_is_refused(standalone_server,
                                                     squid_proxy, temp):
    server, squid = standalone_server(), squid_proxy(users=USERS)
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], config(
        server.cgi_url, temp, ProxyURL=squid.url(), ProxyAuthType='basic',
        ProxyUsername='responder', ProxyPassword='wrong'))
    err = result.stderr.decode()
    assert result.returncode == 8 and 'Status = [407]' in err, err
    assert 'wrong' not in err and server.log_lines() == []


def test_a_refusing_proxy_is_not_retried(standalone_server, squid_proxy,
                                         temp):
    server, squid = standalone_server(), squid_proxy(access='deny')
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], config(
        server.cgi_url, temp, ProxyURL=squid.url(), UploadOnGetFailure='Y',
        PutRetryCount=3, PutRetryDelay=0))
    err = result.stderr.decode()
    assert result.returncode == 11, err        # GET and PUT refused
    assert err.count('Status = [403]') == 2 and 'attempt' not in err
    assert server.log_lines() == [] and len(squid.access_lines(2)) == 2


@pytest.mark.parametrize('scheme', ['http', 'https'])
def test_a_proxy_dropping_the_upload_midway_is_retried(
        standalone_server, tls_server, squid_proxy, fault_proxy, pki, temp,
        scheme):
    """The fault proxy stands in front of Squid, so the client sees its
    proxy connection drop halfway through the PUT."""
    server = tls_server if scheme == 'https' else standalone_server()
    squid = squid_proxy()
    cut = fault_proxy(squid.port)
    cut.plan(FaultPlan(), FaultPlan(request_cut=700))   # the GET passes
    url = '%s://%s:%d%s' % (scheme, LOOPBACK, server.port, CGI_PATH)
    extra = tls_controls(pki) if scheme == 'https' else {}
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], config(
        url, temp, ProxyURL=cut.url(), PutRetryCount=2, PutRetryDelay=0,
        **extra))
    assert result.returncode == 0, result.stderr
    assert b'attempt 1 of 3 failed' in result.stderr and cut.cuts == 1
    assert len(stored(server)) == 1


def test_the_hosts_proxy_variables_are_ignored_by_default(
        standalone_server, temp):
    server = standalone_server()
    dead = 'http://%s:%d/' % (LOOPBACK, free_port())
    env = dict(os.environ, http_proxy=dead, HTTP_PROXY=dead)
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'],
                        config(server.cgi_url, temp), env=env)
    assert result.returncode == 0, result.stderr
    assert len(stored(server)) == 1


def test_proxy_use_environment_takes_http_proxy_and_no_proxy(
        standalone_server, squid_proxy, temp):
    server, squid = standalone_server(), squid_proxy()
    env = dict(os.environ, http_proxy=squid.url().rstrip('/'))
    env.pop('no_proxy', None)
    env.pop('NO_PROXY', None)
    cfg = config(server.cgi_url, temp, ProxyUseEnvironment='Y',
                 OverwriteExecutable='Y')
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg, env=env)
    assert result.returncode == 0, result.stderr
    assert len(squid.access_lines(2)) == 2
    env['no_proxy'] = 'example.org, 127.0.0.1'
    again = run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg, env=env)
    assert again.returncode == 0, again.stderr
    assert len(stored(server)) == 2 and len(squid.access_lines()) == 2


@pytest.mark.parametrize('value', ['https://%s:3128/' % LOOPBACK,
                                   'http://%s:3128/path' % LOOPBACK])
def test_a_proxy_url_that_is_not_http_is_a_config_error(temp, value):
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], config(
        'http://%s:1/x' % LOOPBACK, temp, ProxyURL=value))
    err = result.stderr.decode()
    assert result.returncode == 5 and 'ProxyURL' in err, err


# Re-sends under the CGI front ends ###########################################

def test_a_lost_answer_under_apache_is_stored_once(apache_server,
                                                   fault_proxy, temp):
    server = apache_server()
    server.clean()
    cut = fault_proxy(server.port)
    cut.plan(FaultPlan(), FaultPlan(response_cut=20))
    url = cut.url(CGI_PATH)
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], config(
        url, temp, URLAuthType='basic', URLUsername='client_1',
        URLPassword='secret-1', PutRetryCount=2, PutRetryDelay=0))
    assert result.returncode == 0, result.stderr
    assert len(stored(server)) == 1
    assert [line.split()[11] for line in server.log_lines(3)] == [
        '200', '200', '253']


def test_a_lost_answer_under_nginx_is_stored_once(nginx_server, fault_proxy,
                                                  pki, temp):
    """nginx serves HTTPS only: the cut must fall in the TLS record of the
    answer, so one undisturbed job measures where that record is."""
    server = nginx_server
    server.clean()
    cut = fault_proxy(server.port)
    url = 'https://%s:%d%s' % (LOOPBACK, cut.port, server.cgi_url.split(
        str(server.port), 1)[1])
    cfg = config(url, temp, URLAuthType='basic', URLUsername='client_1',
                 URLPassword='secret-1', PutRetryCount=2, PutRetryDelay=0,
                 OverwriteExecutable='Y', SSLUseCertificate='Y',
                 SSLPublicCertFile=pki.path('client.crt'),
                 SSLPrivateKeyFile=pki.path('client.key'), **tls_controls(pki))
    assert run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg).returncode == 0
    answer = cut.wait_traffic(2)[1][1]
    cut.plan(FaultPlan(), FaultPlan(response_cut=answer - 60))
    result = run_webjob(['-e', '-f', '-', 'hostname.sh'], cfg)
    assert result.returncode == 0, result.stderr
    assert b'attempt 1 of 3 failed' in result.stderr
    assert len(stored(server)) == 2
    assert [line.split()[11] for line in server.log_lines(5)][2:] == [
        '200', '200', '253']
