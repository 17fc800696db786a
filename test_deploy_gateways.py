"""Every front end answers every failure as that failure, never a success.

The same CGI runs under Apache as nph-webjob.cgi (its own status line) and
as webjob.cgi (a Status: field), under nginx + fcgiwrap under both names
(fcgiwrap re-parses whatever the CGI writes, so the CGI must notice and
write a Status: field even when named nph-), and as the standalone server.
Each failure the server can be made to give through a deployment is asked
for on each; each must reach the client with its own status, be logged with
it, and store nothing.  Also: TRACE is off in the README's Apache, and a
client certificate binds the Basic user on every front end that takes both.
"""

import base64
import http.client
import os
import shutil
import ssl
import subprocess
import sys

import pytest

import nph_webjob
from conftest import (CGI_PATH, LOOPBACK, PARSED_CGI_PATH, WEBJOB,
                      read_log_lines, write_file)

GET_QUERY = ('VERSION=webjob-1.0.0&SYSTEM=Linux&CLIENTID=%s&FILENAME=%s'
             '&RUNTYPE=snapshot')
PUT_LENGTHS = '&STDOUT_LENGTH=%d&STDERR_LENGTH=%d&STDENV_LENGTH=%d'

#: Each failure a deployment can be driven to: (name, method, client id,
#: file name, body, lengths in the query or None, expected status).
FAILURES = (
    ('missing program', 'GET', 'client_1', 'missing.sh', None, None, 404),
    ('method', 'DELETE', 'client_1', 'hostname.sh', None, None, 405),
    ('bad query', 'GET', 'client_1', 'no/such', None, None, 450),
    ('other client', 'GET', 'client_2', 'hostname.sh', None, None, 453),
    ('no length', 'PUT', 'client_1', 'hostname.sh', None, (0, 0, 0), 454),
    ('over the cap', 'PUT', 'client_1', 'capped.sh', b'x' * 10, (10, 0, 0),
     455),
    ('length mismatch', 'PUT', 'client_1', 'hostname.sh', b'x' * 10,
     (3, 0, 0), 456),
    ('not a file', 'GET', 'client_1', 'folder.sh', None, None, 457),
    ('bad override', 'GET', 'client_1', 'broken.sh', None, None, 550),
)


class FrontEnd(object):
    """One way to reach the CGI: host, port, path, TLS context or None, the
    BaseDirectory and the override folder."""

    def __init__(self, port, path, root, overrides, context=None):
        self.port, self.path, self.root = port, path, root
        self.overrides, self.context = overrides, context

    def request(self, method, query, body=None, user='client_1',
                password=None):
        """(status, reason, {field: value}, body) of one request."""
        password = password or {'client_1': 'secret-1',
                                'client_2': 'secret-2'}[user]
        if self.context is None:
            conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=60)
        else:
            conn = http.client.HTTPSConnection(LOOPBACK, self.port, timeout=60,
                                               context=self.context)
        try:
            conn.putrequest(method, '%s?%s' % (self.path, query),
                            skip_accept_encoding=True)
            conn.putheader('Authorization', 'Basic ' + base64.b64encode((
                '%s:%s' % (user, password)).encode()).decode())
            if body is not None:
                conn.putheader('Content-Length', str(len(body)))
            conn.putheader('Connection', 'close')
            conn.endheaders(body)
            reply = conn.getresponse()
            return (reply.status, reply.reason, dict(
                (k.lower(), v) for k, v in reply.getheaders()), reply.read())
        finally:
            conn.close()


def client_context(pki, name='client'):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.path('ca.crt'))
    context.check_hostname = False
    context.load_cert_chain(pki.path(name + '.crt'), pki.path(name + '.key'))
    return context


def prepare_failures(root, overrides):
    """What FAILURES needs in a site: a folder where a program would be, a
    command override that caps uploads and one that is not allowed."""
    commands = os.path.join(root, 'profiles', 'client_1', 'commands')
    os.makedirs(os.path.join(commands, 'folder.sh'), exist_ok=True)
    folder = os.path.join(overrides, 'client_1', 'commands')
    os.makedirs(folder, exist_ok=True)
    for path in (overrides, os.path.dirname(folder), folder,
                 os.path.join(commands, 'folder.sh')):
        os.chmod(path, 0o755)
    write_file(os.path.join(folder, 'capped.sh.cfg'),
               b'CapContentLength = Y\nMaxContentLength = 1\n')
    write_file(os.path.join(folder, 'broken.sh.cfg'),
               b'BaseDirectory = /tmp\n')


def remove_failures(root, overrides):
    os.rmdir(os.path.join(root, 'profiles', 'client_1', 'commands',
                          'folder.sh'))
    shutil.rmtree(os.path.join(overrides, 'client_1'))


@pytest.fixture(params=['apache-nph', 'apache-parsed', 'nginx-nph',
                        'nginx-parsed', 'standalone'])
def front_end(request, tmp_path, pki):
    """Each deployment the README describes, reached the way it says, with
    the site prepared for FAILURES (and cleaned up after)."""
    kind = request.param
    if kind.startswith('apache'):
        server = request.getfixturevalue('apache_server')()
        server.clean()
        front = FrontEnd(server.port, CGI_PATH if kind == 'apache-nph' else
                         PARSED_CGI_PATH, server.root,
                         os.path.join(server.top, 'clients'))
    elif kind.startswith('nginx'):
        server = request.getfixturevalue('nginx_server')
        server.clean()
        front = FrontEnd(server.port, CGI_PATH if kind == 'nginx-nph' else
                         PARSED_CGI_PATH, server.root,
                         os.path.join(server.top, 'clients'),
                         client_context(pki))
    else:
        passwords = str(tmp_path / 'htpasswd')
        for flag, user, password in (('-cbm', 'client_1', 'secret-1'),
                                     ('-bm', 'client_2', 'secret-2')):
            subprocess.run(['htpasswd', flag, passwords, user, password],
                           check=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        server = request.getfixturevalue('standalone_server')(
            args=['--htpasswd', passwords])
        front = FrontEnd(server.port, CGI_PATH, str(server.root),
                         os.path.join(str(server.root), 'config', 'clients'))
    prepare_failures(front.root, front.overrides)
    try:
        yield front
    finally:
        remove_failures(front.root, front.overrides)


def test_every_failure_reaches_the_client_as_itself(front_end):
    """No name, gateway or front end turns a server error into a success:
    the client sees the status the server logged, and nothing is stored."""
    status, reason, fields, body = front_end.request(
        'GET', GET_QUERY % ('client_1', 'hostname.sh'))
    assert (status, fields.get('job-id', '')[:9]) == (200, 'server_1_')
    assert body.startswith(b'#!/bin/sh')
    wrong = []
    for name, method, client, filename, data, lengths, want in FAILURES:
        query = GET_QUERY % (client, filename) + (
            PUT_LENGTHS % lengths if lengths else '')
        status, reason, fields, body = front_end.request(method, query, data)
        if status != want or body or 'job-id' in fields:
            wrong.append((name, want, status, reason, body[:80]))
    assert wrong == []
    lines = read_log_lines(front_end.root, len(FAILURES) + 1)
    assert sorted(int(line.split()[11]) for line in lines) == \
        sorted([200] + [failure[-1] for failure in FAILURES])
    assert os.listdir(os.path.join(front_end.root, 'incoming')) == []


@pytest.mark.parametrize('status', sorted(
    code for code in nph_webjob.STATUS_REASONS if code >= 300))
@pytest.mark.parametrize('environ', [
    {'FCGI_ROLE': 'RESPONDER', 'SERVER_SOFTWARE': 'Apache/2.4'},
    {'SERVER_SOFTWARE': 'nginx/1.22.1'},
    {'SERVER_SOFTWARE': 'lighttpd/1.4.69'}], ids=['fcgi', 'nginx', 'lighttpd'])
def test_nph_name_under_a_reparsing_gateway_writes_a_status_field(environ,
                                                                 status):
    """Under a gateway that parses CGI output, an nph- name still answers
    with 'Status:', which the gateway turns into this very status."""
    assert not nph_webjob.wants_nph(environ, '/cgi/nph-webjob.cgi')
    exchange = nph_webjob.Exchange(dict(environ, REQUEST_METHOD='GET'))
    exchange.status = status
    out = FakeOut()
    nph_webjob.send_response(exchange, out, nph_webjob.wants_nph(
        environ, '/cgi/nph-webjob.cgi'))
    assert out.data.startswith(('Status: %d %s\r\n' % (
        status, nph_webjob.STATUS_REASONS[status])).encode())


def test_nph_name_under_apache_keeps_the_original_status_line():
    assert nph_webjob.wants_nph({'SERVER_SOFTWARE': 'Apache/2.4.71 (Debian)'},
                                '/cgi/nph-webjob.cgi')
    assert not nph_webjob.wants_nph({'SERVER_SOFTWARE': 'Apache/2.4'},
                                    '/cgi/webjob.cgi')


class FakeOut(object):
    data = b''

    def write(self, data):
        self.data += data


def test_readme_apache_turns_trace_off(apache_server):
    """TRACE would echo the Authorization header back to any page that can
    make the browser send it."""
    server = apache_server()
    conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=60)
    conn.request('TRACE', CGI_PATH, headers={
        'Authorization': 'Basic ' + base64.b64encode(
            b'client_1:secret-1').decode()})
    reply = conn.getresponse()
    body = reply.read()
    conn.close()
    assert reply.status == 405
    assert b'secret' not in body and b'Y2xpZW50' not in body


@pytest.mark.parametrize('certificate, user, client', [
    ('client-2', 'client_1', 'client_1'), ('client', 'client_2', 'client_2')])
def test_nginx_binds_the_certificate_cn_to_the_basic_user(
        nginx_server, pki, certificate, user, client):
    """client_2's certificate with client_1's password (or the reverse) is
    refused before the CGI, as the README's Apache refuses it."""
    nginx_server.clean()
    front = FrontEnd(nginx_server.port, PARSED_CGI_PATH, nginx_server.root,
                     None, client_context(pki, certificate))
    body = b'out\n'
    status = front.request('PUT', GET_QUERY % (client, 'hostname.sh') +
                           PUT_LENGTHS % (4, 0, 0), body, user=user)[0]
    assert status == 403
    assert os.listdir(os.path.join(nginx_server.root, 'incoming')) == []
    assert read_log_lines(nginx_server.root) == []


def test_nginx_still_takes_a_matching_certificate_and_user(nginx_server, pki):
    nginx_server.clean()
    front = FrontEnd(nginx_server.port, PARSED_CGI_PATH, nginx_server.root,
                     None, client_context(pki, 'client-2'))
    status, reason, fields, body = front.request(
        'GET', GET_QUERY % ('client_2', 'common.sh'), user='client_2')
    assert status == 200 and body.startswith(b'#!/bin/sh')


def test_apache_binds_the_certificate_cn_to_the_basic_user(apache_tls_server,
                                                           pki):
    apache_tls_server.clean()
    front = FrontEnd(apache_tls_server.tls_ports['main'], CGI_PATH,
                     apache_tls_server.root, None,
                     client_context(pki, 'client-2'))
    status = front.request('GET', GET_QUERY % ('client_1', 'hostname.sh'))[0]
    assert status == 401
    assert read_log_lines(apache_tls_server.root) == []


def test_cgi_refuses_a_certificate_cn_that_is_not_the_user(tmp_path):
    """Should a front end pass both and not compare them, the CGI does."""
    root = str(tmp_path / 'base')
    for sub in ('incoming', 'logfiles', 'profiles/client_1/commands'):
        os.makedirs(os.path.join(root, sub))
    write_file(os.path.join(root, 'profiles/client_1/commands/hostname.sh'),
               b'#!/bin/sh\n')
    site = nph_webjob.load_site(None, overrides={'BaseDirectory': root})
    exchange = nph_webjob.process_request({
        'REQUEST_METHOD': 'GET', 'REMOTE_USER': 'client_1',
        'SSL_CLIENT_VERIFY': 'SUCCESS', 'SSL_CLIENT_S_DN_CN': 'client_2',
        'QUERY_STRING': GET_QUERY % ('client_1', 'hostname.sh')}, None, site)
    assert exchange.status == 453
    assert 'certificate' in exchange.message


def client_config(folder, url, pki, **extra):
    """A job config as client_1, every SSL control on (as the README's)."""
    controls = dict(
        ClientId='client_1', URLGetURL=url, URLPutURL=url,
        TempDirectory=str(folder), OverwriteExecutable='Y', HashType='SHA256',
        SSLVerifyPeerCert='Y', SSLBundledCAsFile=pki.path('ca.crt'),
        SSLExpectedPeerCN='webjob.test', SSLMaxChainLength='1',
        SSLUseCertificate='Y', SSLPublicCertFile=pki.path('client.crt'),
        SSLPrivateKeyFile=pki.path('client.key'), URLAuthType='basic',
        URLUsername='client_1', URLPassword='secret-1')
    controls.update(extra)
    path = os.path.join(str(folder), 'job.cfg')
    write_file(path, ''.join('%s=%s\n' % pair for pair in
                             sorted(controls.items())).encode())
    return path


def run_client(cfg, program):
    return subprocess.run([sys.executable, WEBJOB, '-e', '-f', cfg, program],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=120)


def test_client_under_nginx_and_the_nph_name_sees_failures(tmp_path,
                                                           nginx_server, pki):
    """The original's name behind fcgiwrap: a missing program is not run as
    an empty file, and a refused upload is not taken for stored, so
    UnlinkOutput=Y keeps the client's only copy."""
    nginx_server.clean()
    url = 'https://%s:%d%s' % (LOOPBACK, nginx_server.port, CGI_PATH)
    work = tmp_path / 'job'
    work.mkdir()
    cfg = client_config(work, url, pki, UnlinkOutput='Y')
    result = run_client(cfg, 'missing.sh')
    assert result.returncode != 0
    assert b'Status = [404]' in result.stderr, result.stderr
    commands = os.path.join(nginx_server.root, 'profiles', 'client_1',
                            'commands')
    write_file(os.path.join(commands, 'capped.sh'), b'#!/bin/sh\necho kept\n',
               0o755)
    overrides = os.path.join(nginx_server.top, 'clients')
    prepare_failures(nginx_server.root, overrides)
    try:
        result = run_client(cfg, 'capped.sh')
    finally:
        remove_failures(nginx_server.root, overrides)
        os.unlink(os.path.join(commands, 'capped.sh'))
    assert result.returncode != 0
    assert b'Status = [455]' in result.stderr, result.stderr
    kept = [name for name in os.listdir(str(work)) if name.endswith('.out')]
    assert len(kept) == 1
    assert (work / kept[0]).read_bytes() == b'kept\n'
    assert os.listdir(os.path.join(nginx_server.root, 'incoming')) == []
