"""Secrets never leave the process (issue 12).

Distinct secrets are planted in every place a config can hold one (the
password of each URL, with '@', ':' and '%' around it in the user, path and
query; URLPassword; SSLPassPhrase), and everything the client and its
children can see is searched for them: its stdout and stderr, every file it
leaves, what it uploads, and what the downloaded program and GetHook can
read (their environment, standard input, command lines, the parent's
/proc entries, the files in TempDirectory).
"""

import os
import socket
import subprocess
import sys

import pytest

import webjob
from test_client import (ScriptedServer, WEBJOB, assert_clean_error,
                         run_webjob, write_cfg)

GET_SECRET = 'Get-Pass:w0rd%41'          # ':' and '%' inside the password
PUT_SECRET = 'Put-Secret-77'             # URLPassword, reached through %pass
PHRASE = 'Phrase-Of-The-Key-5150'        # SSLPassPhrase
SECRETS = (GET_SECRET, PUT_SECRET, PHRASE)

# Everything a program can look at, printed to its stdout (uploaded).
SPY = b'''#!/bin/sh
echo "ARGS: $0 $*"
echo "== env"; env
echo "== stdin"; cat
echo "== reopened stdin"; cat /proc/self/fd/0 2>&1
echo "== parent stdin"; cat /proc/$PPID/fd/0 2>&1
echo "== parent cmdline"; tr '\\0' ' ' < /proc/$PPID/cmdline
echo "== parent environ"; tr '\\0' '\\n' < /proc/$PPID/environ
echo "== own cmdline"; tr '\\0' ' ' < /proc/self/cmdline
for f in "$(dirname "$0")"/*; do
  case "$f" in *.out|*.err) continue;; esac
  echo "== file $f"; cat "$f"
done
'''

HOOK = ('cp %vp %tp; { env; cat; cat /proc/self/fd/0; cat /proc/$PPID/fd/0;'
        ' tr "\\0" " " < /proc/$PPID/cmdline; } > hook.seen 2>&1; true')


def refused_port():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def everything_in(folder):
    """The bytes of every file under folder, with its name."""
    seen = []
    for root, dirs, files in os.walk(str(folder)):
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'rb') as handle:
                seen.append((path, handle.read()))
    return seen


def assert_no_secret(where, data, secrets=SECRETS):
    for secret in secrets:
        encoded = secret.encode('utf-8', 'surrogateescape')
        assert encoded not in data, (secret, where, data[:2000])


@pytest.fixture
def tls_server(pki, tmp_path):
    """A scripted HTTPS server that requires a client certificate, and a
    copy of the client key encrypted with PHRASE."""
    server = ScriptedServer()
    server.tls = pki.server_context(require_client=True)
    key = str(tmp_path / 'client-phrase.key')
    subprocess.run(['openssl', 'pkey', '-in', pki.path('client.key'),
                    '-aes256', '-passout', 'pass:' + PHRASE, '-out', key],
                   check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server.client_key = key
    yield server
    server.close()


def get_url(port):
    """URLGetURL with the GET secret as its password, '@', ':' and '%' in
    the user, path and query around it."""
    return ('https://get%%25user:%s@127.0.0.1:%d/cgi-client/nph-webjob.cgi'
            '?m=a@b:c%%40d' % (GET_SECRET, port))


def secret_config(server, pki, job_dir, get_port=None, **extra):
    """Every secret in play: the GET URL's password, URLPassword through
    %pass in the PUT URL, SSLPassPhrase for the client key."""
    controls = dict(
        ClientId='client_1', TempDirectory=str(job_dir),
        URLGetURL=get_url(get_port or server.port),
        URLPutURL='https://putuser:%%pass@127.0.0.1:%d/cgi/p@th:x' % server.port,
        URLAuthType='basic', URLUsername='putuser', URLPassword=PUT_SECRET,
        SSLUseCertificate='Y', SSLPublicCertFile=pki.path('client.crt'),
        SSLPrivateKeyFile=server.client_key, SSLPassPhrase=PHRASE)
    controls.update(extra)
    return ''.join('%s=%s\n' % item for item in controls.items()).encode()


def basic_credentials(user, password):
    return webjob.authorization_field(webjob.Target(
        'http://%s:%s@h/' % (user, password))).split(': ', 1)[1]


def run_with_config_on_stdin(tmp_path, text, args):
    """`webjob -e -f - prog < cfg`, stdin a real file (it can be reopened)."""
    cfg = tmp_path / 'stdin.cfg'
    cfg.write_bytes(text)
    env = dict(os.environ)
    env.pop('WEBJOB_DEBUG', None)
    with open(str(cfg), 'rb') as stdin:
        return subprocess.run([sys.executable, WEBJOB] + args, stdin=stdin,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, timeout=120)


def test_no_secret_reaches_the_program_hook_records_or_messages(
        tmp_path, pki, tls_server):
    job_dir = tmp_path / 'temp'
    job_dir.mkdir()
    tls_server.program = SPY
    text = secret_config(tls_server, pki, job_dir, GetHookEnable='Y',
                         GetHookSuffix='.sig', GetHookStatus='0',
                         GetHookCommandLine=HOOK)
    result = run_with_config_on_stdin(tmp_path, text, ['-e', '-f', '-',
                                                       'spy.sh', 'opt'])
    assert result.returncode == 0, result.stderr
    get, put = tls_server.requests
    # The secrets were in play: each went where it must, on the wire.
    assert get.header('Authorization') == basic_credentials('get%25user',
                                                            GET_SECRET)
    assert put.header('Authorization') == basic_credentials('putuser',
                                                            PUT_SECRET)
    uploaded = put.body
    # The program saw its own arguments and an empty standard input.
    assert b'ARGS: ' in uploaded and b' opt\n' in uploaded
    assert b'== stdin\n== reopened stdin\n== parent stdin\n== parent' \
        in uploaded, uploaded
    assert_no_secret('upload', uploaded)
    assert_no_secret('stdout', result.stdout)
    assert_no_secret('stderr', result.stderr)
    hook_seen = (job_dir / 'hook.seen').read_bytes()
    assert b'PATH=' in hook_seen and b'webjob.py' in hook_seen
    for path, data in everything_in(tmp_path):
        if path == str(tmp_path / 'stdin.cfg') or 'client-phrase' in path:
            continue
        assert_no_secret(path, data)


def test_no_secret_in_an_uploaded_get_error(tmp_path, pki, tls_server):
    job_dir = tmp_path / 'temp'
    job_dir.mkdir()
    text = secret_config(tls_server, pki, job_dir, get_port=refused_port(),
                         UploadOnGetFailure='Y')
    result = run_with_config_on_stdin(tmp_path, text, ['-e', '-f', '-', 'x'])
    assert_clean_error(result, 8, 'connect')
    put = tls_server.requests[-1]
    assert put.method == 'PUT'
    assert b'GetError=https://get%25user:********@127.0.0.1' in put.body
    assert_no_secret('upload', put.body)
    assert_no_secret('stderr', result.stderr)
    for path, data in everything_in(job_dir):
        assert_no_secret(path, data)


BAD_LINES = [
    # a control without '=' holding the secret
    'URLPassword %s' % PUT_SECRET,
    'SSLPassPhrase %s' % PHRASE,
    # a stray line that is nothing but the secret
    GET_SECRET,
    # a malformed URL control (a space, then a '/' inside the password)
    'URLGetURL=http://u:%s @127.0.0.1/x' % GET_SECRET,
    'URLGetURL=http://u:%s/x@127.0.0.1/x?q=a@b' % GET_SECRET,
    'URLPutURL=ftp://u:%s@127.0.0.1/x' % GET_SECRET,
    # a bad value of a secret control cannot exist (text), but a bad
    # neighbour must not echo it
    'URLPassword=%s\nRunType=%s' % (PUT_SECRET, 'bogus'),
    # the proxy's password, as a control and inside a malformed ProxyURL
    'ProxyPassword %s' % PUT_SECRET,
    'ProxyPassword=%s\nRunType=%s' % (PUT_SECRET, 'bogus'),
    'ProxyURL=http://u:%s@127.0.0.1:3128/path' % GET_SECRET,
]


@pytest.mark.parametrize('line', BAD_LINES)
def test_a_bad_config_line_never_echoes_a_secret(tmp_path, line):
    cfg = tmp_path / 'bad.cfg'
    cfg.write_text('ClientId=c\nURLGetURL=http://127.0.0.1:%d/x\n%s\n'
                   % (refused_port(), line))
    result = run_webjob(['-e', '-f', str(cfg), 'x'])
    assert_clean_error(result, 5, '%s:' % cfg)
    assert_no_secret('stderr', result.stderr)


@pytest.mark.parametrize('url', [
    'http://u:%s@127.0.0.1:PORT/cgi?m=a@b' % GET_SECRET,
    'http://u:%s/y@127.0.0.1:PORT/x' % GET_SECRET,
    'http://u:%s@127.0.0.1:PORT' % GET_SECRET,
    'gopher://u:%s@127.0.0.1:PORT/' % GET_SECRET,
])
def test_get_url_errors_never_echo_the_password(url):
    result = run_webjob(['-g', url.replace('PORT', str(refused_port()))])
    assert result.returncode in (4, 8), result.stderr
    assert_clean_error(result, result.returncode)
    assert_no_secret('stderr', result.stderr)


def test_redaction_hides_what_the_parser_takes_as_the_password():
    url = 'http://u:%s@host:8080/cgi?m=a@b:c' % GET_SECRET
    assert webjob.parse_url(url)[2] == GET_SECRET
    assert webjob.redact_url(url) == 'http://u:********@host:8080/cgi?m=a@b:c'


def test_non_utf8_password_is_sent_as_written_and_never_shown(tmp_path):
    server = ScriptedServer()
    try:
        server.respond = lambda request: (
            b'HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n')
        cfg = tmp_path / 'latin1.cfg'
        cfg.write_bytes(b'ClientId=c\nURLAuthType=basic\nURLUsername=u\n'
                        b'URLPassword=p\xe4ss\xffw0rd\nURLGetURL=http://127.0.0.1'
                        b':%d/x\nTempDirectory=%s\n'
                        % (server.port, str(tmp_path).encode()))
        result = run_webjob(['-e', '-f', str(cfg), 'x'])
        assert_clean_error(result, 8, 'Status = [401]')
        import base64
        sent = server.requests[0].header('Authorization')
        assert base64.b64decode(sent.split()[1]) == b'u:p\xe4ss\xffw0rd'
        assert b'ss\\x' not in result.stderr and b'w0rd' not in result.stderr
    finally:
        server.close()


def test_wrong_pass_phrase_is_named_without_showing_it(tmp_path, pki,
                                                      tls_server):
    job_dir = tmp_path / 'temp'
    job_dir.mkdir()
    text = secret_config(tls_server, pki, job_dir,
                         SSLPassPhrase='Not-' + PHRASE)
    result = run_with_config_on_stdin(tmp_path, text, ['-e', '-f', '-', 'x'])
    assert_clean_error(result, 7, 'SSLPassPhrase', 'SSLPrivateKeyFile')
    assert b'Not-' not in result.stderr
    assert_no_secret('stderr', result.stderr)
