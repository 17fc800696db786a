"""Shared test fixtures: interpreters, ports, server trees, the standalone
nph_webjob.py server, the test PKI, a real Apache running nph-webjob.cgi
(plain HTTP and mod_ssl vhosts), and nginx + fcgiwrap running webjob.cgi.

Everything here starts real processes on 127.0.0.1 and waits on ports or
files, never on sleeps.  Used by every test_*.py.
"""

import asyncio
import base64
import glob
import grp
import hashlib
import http.client
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
NPH_WEBJOB = os.path.join(HERE, 'nph_webjob.py')
WEBJOB = os.path.join(HERE, 'webjob.py')
CGI_PATH = '/cgi-client/nph-webjob.cgi'        # NPH: the CGI's own status line
PARSED_CGI_PATH = '/cgi-client/webjob.cgi'     # parsed-header: 'Status:'
STUB_CGI_PATH = '/cgi-client/nph-webjob-stub.cgi'  # nph_webjob.py install-cgi
PARSED_STUB_CGI_PATH = '/cgi-client/webjob-stub.cgi'   # the same, parsed-header
LOOPBACK = '127.0.0.1'


# Interpreters ################################################################

def _version_of(python):
    return tuple(int(part) for part in python.split(os.sep)[-3].split('.'))


#: Every installed 3.x interpreter, oldest first.
PYTHONS = sorted(glob.glob('/root/.pyenv/versions/3.*/bin/python'),
                 key=_version_of)
REQUIRED_PYTHONS = ('3.6.15', '3.13.0')
_MISSING = [version for version in REQUIRED_PYTHONS
            if '/root/.pyenv/versions/%s/bin/python' % version not in PYTHONS]
if _MISSING or _version_of(PYTHONS[0]) != (3, 6, 15):
    raise RuntimeError(
        'conftest: the end-to-end tests run on the oldest and the newest '
        'supported Python, /root/.pyenv/versions/{%s}/bin/python; missing: '
        '%s (found: %s)' % (','.join(REQUIRED_PYTHONS),
                            ', '.join(_MISSING) or 'an older 3.x sorts first',
                            ', '.join(PYTHONS) or 'none'))
OLDEST_PY = PYTHONS[0]
NEWEST_PY = PYTHONS[-1]


# Ports #######################################################################

def free_port(host=LOOPBACK):
    """A port nobody listens on right now (the caller retries on a race)."""
    sock = socket.socket()
    try:
        sock.bind((host, 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def wait_for_port(host, port, timeout=60.0, proc=None):
    """Return once something accepts on host:port; raise on timeout or when
    proc (if given) exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError as exc:
            error = exc
        if proc is not None and proc.poll() is not None:
            raise RuntimeError('process exited (status %s) before listening '
                               'on %s:%d' % (proc.returncode, host, port))
        if time.monotonic() > deadline:
            raise RuntimeError('nothing listens on %s:%d after %.0f s: %s'
                               % (host, port, timeout, error))
        time.sleep(0.02)     # poll interval while waiting on the port


def stop_process(proc, timeout=10.0):
    """SIGTERM the process group, SIGKILL after timeout; return the status
    of the leader."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, signum)
        except OSError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


# Server trees ################################################################

CLIENT_PROGRAM = b'#!/bin/sh\necho "hello from client_1 $*"\n'
COMMON_PROGRAM = b'#!/bin/sh\necho "hello from common $*"\n'


def write_file(path, data, mode=0o644):
    """Create or replace a file with the given bytes and mode."""
    with open(str(path), 'wb') as handle:
        handle.write(data)
    os.chmod(str(path), mode)
    return path


def make_server_root(root):
    """A BaseDirectory: incoming/, logfiles/, profiles/ with a client_1
    profile (hostname.sh) and a common one (common.sh)."""
    root = str(root)
    for sub in ('incoming', 'logfiles', 'profiles/client_1/commands',
                'profiles/common/commands'):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    write_file(os.path.join(root, 'profiles/client_1/commands/hostname.sh'),
               CLIENT_PROGRAM, 0o755)
    write_file(os.path.join(root, 'profiles/common/commands/common.sh'),
               COMMON_PROGRAM, 0o755)
    return root


def wait_for_lines(path, count, timeout=60.0):
    """The lines of a file once it has at least count (deadline loop: the
    server writes its logs after it has answered)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(str(path)) as handle:
                lines = handle.read().splitlines()
        except OSError:
            lines = []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)     # poll interval while waiting on the file


def read_log_lines(root, count=0, timeout=60.0):
    """The lines of logfiles/nph-webjob.log under a BaseDirectory, once it
    has at least count."""
    return wait_for_lines(os.path.join(str(root), 'logfiles',
                                       'nph-webjob.log'), count, timeout)


@pytest.fixture
def server_root(tmp_path):
    """A fresh BaseDirectory (a pathlib.Path): the layout, two profiles."""
    make_server_root(tmp_path / 'server')
    return tmp_path / 'server'


# Standalone server ###########################################################

class StandaloneServer(object):
    """A running 'nph_webjob.py serve'."""

    def __init__(self, proc, port, root, stderr_path):
        self.proc = proc
        self.port = port
        self.root = root
        self.stderr_path = stderr_path
        self.url = 'http://%s:%d/' % (LOOPBACK, port)
        self.cgi_url = 'http://%s:%d%s' % (LOOPBACK, port, CGI_PATH)

    def log_lines(self, count=0):
        """The log's lines, after waiting for at least count of them."""
        return read_log_lines(self.root, count)

    def incoming(self):
        return sorted(os.listdir(os.path.join(str(self.root), 'incoming')))

    def stderr(self):
        with open(self.stderr_path, 'rb') as handle:
            return handle.read().decode('utf-8', 'replace')

    def stop(self, signum=signal.SIGTERM, timeout=60.0):
        """Send signum to the server alone; return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        return stop_process(self.proc)


def start_standalone(work, python=None, root=None, args=(), cwd=None):
    """Run 'python nph_webjob.py serve --root R --port P [args]' from work
    (or cwd), a fresh make_server_root tree under work unless root is
    given, on a free port (three tries); a listening StandaloneServer.
    Also used by bench_webjob.py."""
    root = os.path.join(cwd or work, str(root)) if root is not None \
        else make_server_root(os.path.join(work, 'server'))
    stderr_path = os.path.join(work, 'serve.stderr')
    for attempt in range(3):
        port = free_port()
        with open(stderr_path, 'wb') as err:
            proc = subprocess.Popen(
                [python or sys.executable, NPH_WEBJOB, 'serve', '--root',
                 root, '--port', str(port)] + list(args),
                cwd=cwd or work, stdin=subprocess.DEVNULL, stdout=err,
                stderr=subprocess.STDOUT, start_new_session=True)
        server = StandaloneServer(proc, port, root, stderr_path)
        try:
            wait_for_port(LOOPBACK, port, proc=proc)
            return server
        except RuntimeError:
            stop_process(proc)
            if attempt == 2 or 'cannot listen' not in server.stderr():
                raise RuntimeError('nph_webjob.py serve did not start: %s'
                                   % server.stderr())


@pytest.fixture
def standalone_server(tmp_path_factory):
    """Factory: start(python=None, root=None, args=(), cwd=None) runs
    start_standalone in a fresh folder; all are stopped at teardown."""
    started = []

    def start(python=None, root=None, args=(), cwd=None):
        work = str(tmp_path_factory.mktemp('standalone'))
        server = start_standalone(work, python, root, args, cwd)
        started.append(server)
        return server

    yield start
    for server in started:
        stop_process(server.proc)


# Test PKI ####################################################################

CA_CONFIG = '''[ ca ]
default_ca = test_ca
[ test_ca ]
dir = .
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
copy_extensions = none
unique_subject = no
[ any ]
commonName = supplied
[ v3_ca ]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
[ v3_leaf ]
basicConstraints = CA:FALSE
'''


class PKI(object):
    """Test CAs and certificates, made by the real openssl at test time.

    In dir: ca and rogue-ca (self-signed, same CN), inter (an intermediate
    under ca); server certificates for CN webjob.test from ca (server), via
    inter (server-via-inter), from rogue-ca (server-rogue), expired
    (server-expired), and CN other.test (server-wrong-cn); client
    certificates for CN client_1 from ca (client, with client.key and
    client-encrypted.key, passphrase flimflam) and rogue-ca (client-rogue),
    and for CN client_2 from ca (client-2).
    Each NAME has NAME.crt, NAME.key and NAME-chain.pem (leaf first).
    """

    def __init__(self, folder):
        self.dir = str(folder)
        with open(self.path('ca.cnf'), 'w') as handle:
            handle.write(CA_CONFIG)
        open(self.path('index.txt'), 'w').close()
        with open(self.path('serial'), 'w') as handle:
            handle.write('1000\n')
        self.self_signed('ca', 'WebJob-Test-CA')
        self.self_signed('rogue-ca', 'WebJob-Test-CA')
        self.issue('inter', 'WebJob-Test-Intermediate', 'ca', ca=True)
        self.issue('server', 'webjob.test', 'ca')
        self.issue('server-via-inter', 'webjob.test', 'inter',
                   chain=['inter'])
        self.issue('server-wrong-cn', 'other.test', 'ca')
        self.issue('server-expired', 'webjob.test', 'ca',
                   dates=('20000101000000Z', '20010101000000Z'))
        self.issue('server-rogue', 'webjob.test', 'rogue-ca')
        self.issue('client', 'client_1', 'ca')
        self.issue('client-2', 'client_2', 'ca')
        self.issue('client-rogue', 'client_1', 'rogue-ca')
        self.openssl('pkey', '-in', 'client.key', '-aes256', '-passout',
                     'pass:flimflam', '-out', 'client-encrypted.key')

    def path(self, name):
        return os.path.join(self.dir, name)

    def openssl(self, *args):
        subprocess.run(('openssl',) + args, cwd=self.dir, check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def self_signed(self, name, cn):
        self.openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout',
                     name + '.key', '-out', name + '.crt', '-subj', '/CN=' + cn,
                     '-days', '30', '-addext', 'basicConstraints=critical,CA:TRUE',
                     '-addext', 'keyUsage=critical,keyCertSign,cRLSign')

    def issue(self, name, cn, issuer, ca=False, dates=None, chain=()):
        self.openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout',
                     name + '.key', '-out', name + '.csr', '-subj', '/CN=' + cn)
        validity = ['-startdate', dates[0], '-enddate', dates[1]] if dates \
            else ['-days', '30']
        self.openssl('ca', '-batch', '-config', 'ca.cnf', '-cert', issuer + '.crt',
                     '-keyfile', issuer + '.key', '-in', name + '.csr', '-out',
                     name + '.crt', '-notext', '-extensions',
                     'v3_ca' if ca else 'v3_leaf', *validity)
        with open(self.path(name + '-chain.pem'), 'wb') as out:
            for part in [name] + list(chain):
                with open(self.path(part + '.crt'), 'rb') as handle:
                    out.write(handle.read())

    def server_context(self, name='server', require_client=False):
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.path(name + '-chain.pem'),
                                self.path(name + '.key'))
        if require_client:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.path('ca.crt'))
        return context


@pytest.fixture(scope='session')
def pki(tmp_path_factory):
    """The session's test PKI (see PKI), made once."""
    return PKI(tmp_path_factory.mktemp('pki'))


# Apache ######################################################################

APACHE = shutil.which('apache2') or '/usr/sbin/apache2'
APACHE_MODULES = '/usr/lib/apache2/modules'
APACHE_USER = 'www-data'
DEFAULT_USERS = (('client_1', 'secret-1'), ('client_2', 'secret-2'))

APACHE_CONF = """\
ServerRoot {top}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {top}/run/httpd.pid
DefaultRuntimeDir {top}/run
Mutex file:{top}/run default
ErrorLog {top}/logs/error_log
LogLevel warn
LogFormat "%h %l %u %t \\"%r\\" %>s %b" common
CustomLog {top}/logs/access_log common
User {user}
Group {group}
LoadModule mpm_prefork_module {modules}/mod_mpm_prefork.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule authn_core_module {modules}/mod_authn_core.so
LoadModule authn_file_module {modules}/mod_authn_file.so
LoadModule auth_basic_module {modules}/mod_auth_basic.so
LoadModule authz_user_module {modules}/mod_authz_user.so
LoadModule alias_module {modules}/mod_alias.so
LoadModule cgi_module {modules}/mod_cgi.so
LoadModule env_module {modules}/mod_env.so
StartServers 4
MinSpareServers 2
MaxSpareServers 8
KeepAlive On
Timeout 30
TraceEnable off
LimitRequestBody 0
DocumentRoot {top}/htdocs
<Directory />
  AllowOverride None
  Require all denied
</Directory>
SetEnv WEBJOB_PROPERTIES_FILE {top}/nph-webjob.cfg
SetEnv PATH {top}/bin:/usr/bin:/bin
SetEnv LD_LIBRARY_PATH {libdir}
ScriptAlias /cgi-client/ {top}/cgi-client/
<Directory {top}/cgi-client>
  Options +FollowSymLinks
  AuthType Basic
  AuthName "WebJob"
  AuthBasicProvider file
  AuthUserFile {top}/htpasswd
  Require valid-user
</Directory>
"""


CONFIG_VARIABLE = 'WEBJOB_PROPERTIES_FILE'   # the CGI's config, in its env


def wait_for_no_process_with(variable, timeout=60.0):
    """Return once no process has variable (b'NAME=value') in its
    environment; raise after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        holders = []
        for pid in os.listdir('/proc'):
            try:
                with open('/proc/%s/environ' % pid, 'rb') as handle:
                    if variable in handle.read().split(b'\0'):
                        holders.append(pid)
            except OSError:     # not a process, or gone meanwhile
                continue
        if not holders:
            return
        if time.monotonic() > deadline:
            raise RuntimeError('processes %s still run with %s after %.0f s'
                               % (', '.join(holders), variable.decode(),
                                  timeout))
        time.sleep(0.02)     # poll interval while the CGIs finish


def _reachable_by_others(path):
    """True when a user other than root can reach and read path."""
    path = os.path.realpath(path)
    if os.stat(path).st_mode & 0o004 == 0:
        return False
    folder = os.path.dirname(path)
    while True:
        if os.stat(folder).st_mode & 0o001 == 0:
            return False
        if folder == os.path.dirname(folder):
            return True
        folder = os.path.dirname(folder)


def _interpreter_for_www(python, scratch):
    """(binary, library folder) of python as www-data can run it.

    pyenv lives under /root (mode 0700): its installation is hard-linked
    (copied across file systems) into scratch, which is world-traversable.
    """
    real = os.path.realpath(python)
    prefix = os.path.dirname(os.path.dirname(real))
    if _reachable_by_others(real):
        return real, os.path.join(prefix, 'lib')
    dest = os.path.join(scratch, 'python-%s' % os.path.basename(
        os.path.dirname(os.path.dirname(python))))
    if not os.path.isdir(dest):
        ignore = shutil.ignore_patterns('test', 'tests', 'site-packages',
                                        'idlelib', 'tkinter', 'turtledemo',
                                        'ensurepip', 'lib2to3', 'include')
        try:
            shutil.copytree(prefix, dest, symlinks=True, ignore=ignore,
                            copy_function=os.link)
        except (OSError, shutil.Error):
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(prefix, dest, symlinks=True, ignore=ignore)
    return (os.path.join(dest, os.path.relpath(real, prefix)),
            os.path.join(dest, 'lib'))


class CgiSite(object):
    """A world-traversable scratch tree from which a web server running as
    www-data serves nph_webjob.py as a CGI: base/ (the BaseDirectory, whose
    incoming/ and logfiles/ www-data owns), bin/python3, cgi-client/
    nph-webjob.cgi and webjob.cgi (links to nph_webjob.py), htpasswd and
    nph-webjob.cfg.  The web server itself is the subclass's business."""

    def __init__(self, scratch, python, users=DEFAULT_USERS, require_user=True,
                 require_match=True, prefix='site-'):
        self.top = tempfile.mkdtemp(prefix=prefix, dir=scratch)
        os.chmod(self.top, 0o755)
        self.users = dict(users)
        self.python = python
        self.root = os.path.join(self.top, 'base')
        self.www = pwd.getpwnam(APACHE_USER)
        for sub in ('run', 'logs', 'htdocs', 'cgi-client', 'bin'):
            os.makedirs(os.path.join(self.top, sub))
        make_server_root(self.root)
        for sub in ('incoming', 'logfiles'):
            os.chown(os.path.join(self.root, sub), self.www.pw_uid,
                     self.www.pw_gid)
        for folder, subs, files in os.walk(self.root):
            os.chmod(folder, 0o755)
        binary, self.libdir = _interpreter_for_www(python, scratch)
        os.symlink(binary, os.path.join(self.top, 'bin', 'python3'))
        self.cgi_target = self._install_scripts()
        subprocess.run([binary, '-m', 'py_compile', os.path.join(
            os.path.dirname(self.cgi_target), 'webjob.py')], check=True)
        for name in ('nph-webjob.cgi', 'webjob.cgi'):
            os.symlink(self.cgi_target,
                       os.path.join(self.top, 'cgi-client', name))
        # The recommended install: a stub over byte code compiled up front,
        # under the NPH name (Apache) and a parsed-header one (nginx).
        for stub in (STUB_CGI_PATH, PARSED_STUB_CGI_PATH):
            subprocess.run([binary, self.cgi_target, 'install-cgi',
                            os.path.join(self.top, 'cgi-client',
                                         os.path.basename(stub))],
                           check=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        self._write_htpasswd()
        self.properties = os.path.join(self.top, 'nph-webjob.cfg')
        write_file(self.properties, (
            'BaseDirectory = %s\nRequireUser = %s\nRequireMatch = %s\n'
            'ServerId = server_1\n' % (self.root, 'YN'[not require_user],
                                       'YN'[not require_match])).encode())

    def _install_scripts(self):
        """The CGI target: the repository's file when www-data can read it,
        else copies of nph_webjob.py and webjob.py side by side."""
        if all(_reachable_by_others(p) for p in (NPH_WEBJOB, WEBJOB)) and \
                os.stat(NPH_WEBJOB).st_mode & 0o001:
            return os.path.realpath(NPH_WEBJOB)
        lib = os.path.join(self.top, 'lib')
        os.makedirs(lib)
        for source in (NPH_WEBJOB, WEBJOB):
            shutil.copy(source, lib)
            os.chmod(os.path.join(lib, os.path.basename(source)), 0o755)
        return os.path.join(lib, 'nph_webjob.py')

    def _write_htpasswd(self):
        path = os.path.join(self.top, 'htpasswd')
        flag = '-cb'
        for user, password in sorted(self.users.items()):
            subprocess.run(['htpasswd', flag, path, user, password],
                           check=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
            flag = '-b'
        os.chmod(path, 0o644)

    def _launch(self, argv, ports, name, attempt):
        """Start the web server as our child; True once it listens on every
        port, False to retry on fresh ports (after the third try, raise)."""
        with open(os.path.join(self.top, 'logs', 'stdout'), 'wb') as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for port in ports:
                wait_for_port(LOOPBACK, port, proc=self.proc)
            return True
        except RuntimeError as exc:
            stop_process(self.proc)
            if attempt == 2:
                raise RuntimeError('%s did not start: %s\n%s'
                                   % (name, exc, self.error_log()))
            return False

    def log_lines(self, count=0):
        """The log's lines, after waiting for at least count of them."""
        return read_log_lines(self.root, count)

    def incoming(self):
        return sorted(os.listdir(os.path.join(self.root, 'incoming')))

    def read_logs(self, *names):
        """The named files of logs/, one after the other, for a report."""
        text = []
        for name in names:
            try:
                with open(os.path.join(self.top, 'logs', name), 'rb') as log:
                    text.append(log.read().decode('utf-8', 'replace'))
            except OSError:
                pass
        return '\n'.join(text)

    def clean(self):
        """Empty incoming/, the log and the manifest, so a test sees only
        its own work (and verify only its own groups).

        A CGI writes its log line after its answer, so the previous test's
        last request may still be logging: wait until no CGI of this site
        runs first.
        """
        wait_for_no_process_with(b'%s=%s' % (
            CONFIG_VARIABLE.encode(), self.properties.encode()))
        incoming = os.path.join(self.root, 'incoming')
        for name in os.listdir(incoming):
            os.unlink(os.path.join(incoming, name))
        for name in ('nph-webjob.log', 'nph-webjob-manifest.sha256'):
            log = os.path.join(self.root, 'logfiles', name)
            if os.path.exists(log):
                open(log, 'w').close()
        # The uploads the server has seen, by Job-Id: tests reuse Job-Ids.
        shutil.rmtree(os.path.join(self.root, 'logfiles',
                                   'nph-webjob-uploads'), ignore_errors=True)


APACHE_TLS_CONF = """\
LoadModule socache_shmcb_module {modules}/mod_socache_shmcb.so
LoadModule ssl_module {modules}/mod_ssl.so
SSLSessionCache shmcb:{top}/run/ssl_scache(512000)
SSLProtocol -all +TLSv1.2 +TLSv1.3
SSLCACertificateFile {ca}
"""

APACHE_TLS_VHOST = """\
Listen 127.0.0.1:{port}
<VirtualHost 127.0.0.1:{port}>
  ServerName webjob.test
  SSLEngine on
  SSLCertificateFile {chain}
  SSLCertificateKeyFile {key}
  SSLVerifyClient require
  SSLVerifyDepth 1
  SSLOptions +StdEnvVars
  <Location /cgi-client/>
    <RequireAll>
      Require valid-user
      Require expr "%{{SSL_CLIENT_S_DN_CN}} == %{{REMOTE_USER}}"
    </RequireAll>
  </Location>
  ScriptAlias /cgi-cert/ {top}/cgi-client/
  <Location /cgi-cert/>
    Require all granted
  </Location>
</VirtualHost>
"""


def apache_tls_sites(pki):
    """The mod_ssl vhosts of the TLS Apache, as ApacheServer's tls argument:
    (CA file, ((vhost name, certificate chain, key), ...)); every vhost
    requires a client certificate from ca and Basic auth by its CN under
    /cgi-client/, and the certificate alone under /cgi-cert/ (the CGI then
    takes the user from SSL_CLIENT_S_DN_CN)."""
    return (pki.path('ca.crt'), tuple(
        (name, pki.path(cert + '-chain.pem'), pki.path(cert + '.key'))
        for name, cert in (('main', 'server'), ('wrong-cn', 'server-wrong-cn'),
                           ('via-inter', 'server-via-inter'),
                           ('expired', 'server-expired'))))


class ApacheServer(CgiSite):
    """Apache httpd (prefork + mod_cgi) serving nph-webjob.cgi with Basic
    auth on a loopback port, from a world-traversable scratch folder; with
    tls (see apache_tls_sites), also mod_ssl vhosts on ports of their own
    (tls_ports: vhost name -> port)."""

    def __init__(self, scratch, python, users=DEFAULT_USERS, require_user=True,
                 require_match=True, tls=None):
        CgiSite.__init__(self, scratch, python, users, require_user,
                         require_match, prefix='apache-')
        self.tls = tls
        self.tls_ports = {}
        self.conf = os.path.join(self.top, 'httpd.conf')
        self.port = None
        self.proc = None
        self._start(self.www, self.libdir)

    def _write_conf(self, group, libdir):
        text = APACHE_CONF.format(
            top=self.top, port=self.port, user=APACHE_USER, group=group,
            modules=APACHE_MODULES, libdir=libdir)
        if self.tls:
            ca, sites = self.tls
            text += APACHE_TLS_CONF.format(modules=APACHE_MODULES,
                                           top=self.top, ca=ca)
            for name, chain, key in sites:
                text += APACHE_TLS_VHOST.format(port=self.tls_ports[name],
                                                chain=chain, key=key,
                                                top=self.top)
        with open(self.conf, 'w') as conf:
            conf.write(text)

    def _start(self, www, libdir):
        group = grp.getgrgid(www.pw_gid).gr_name
        for attempt in range(3):
            self.port = free_port()
            self.tls_ports = dict((name, free_port())
                                  for name, chain, key in (self.tls or
                                                           (None, ()))[1])
            self._write_conf(group, libdir)
            if self._launch([APACHE, '-f', self.conf, '-DFOREGROUND'],
                            [self.port] + sorted(self.tls_ports.values()),
                            'apache2', attempt):
                return

    @property
    def url(self):
        return 'http://%s:%d/' % (LOOPBACK, self.port)

    @property
    def cgi_url(self):
        return 'http://%s:%d%s' % (LOOPBACK, self.port, CGI_PATH)

    def https_url(self, vhost='main', path=CGI_PATH):
        """The URL of path on the named mod_ssl vhost."""
        return 'https://%s:%d%s' % (LOOPBACK, self.tls_ports[vhost], path)

    def error_log(self):
        return self.read_logs('stdout', 'error_log')

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


_APACHES = []


def fail_without(what, *programs):
    """Fail (never skip) when not root or a program is missing: these tests
    start real servers that switch to www-data, and CI installs them all."""
    missing = [name for name in programs if not (
        shutil.which(name) or os.path.exists(name))]
    if os.geteuid() != 0 or missing:
        pytest.fail('%s tests need root and %s; %s (run .ci/run as root, '
                    'which installs them with apt-get)' % (
                        what, ', '.join(programs),
                        'missing: ' + ', '.join(missing) if missing
                        else 'running as uid %d' % os.geteuid()),
                    pytrace=False)


@pytest.fixture(scope='session')
def apache_server():
    """Factory: start(python=None, users=DEFAULT_USERS, require_user=True,
    require_match=True, tls=None) returns a running ApacheServer, one per
    option set for the whole session; all are stopped at the end, failures
    or not.

    Needs root (Apache switches to www-data) and apache2 + htpasswd: fails,
    never skips, without them.
    """
    fail_without('Apache', APACHE, 'htpasswd')
    scratch = tempfile.mkdtemp(prefix='webjob-apache-')
    os.chmod(scratch, 0o755)
    servers = {}

    def start(python=None, users=DEFAULT_USERS, require_user=True,
              require_match=True, tls=None):
        key = (python or NEWEST_PY, tuple(users), require_user, require_match,
               tls)
        if key not in servers:
            server = ApacheServer(scratch, key[0], users, require_user,
                                  require_match, tls)
            servers[key] = server
            _APACHES.append(server)
        return servers[key]

    try:
        yield start
    finally:
        for server in servers.values():
            server.stop()
            _APACHES.remove(server)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope='session')
def apache_tls_server(apache_server, pki):
    """The session's Apache with mod_ssl (see apache_tls_sites): vhosts
    main, wrong-cn, via-inter and expired, plus the plain HTTP port."""
    return apache_server(tls=apache_tls_sites(pki))


# nginx + fcgiwrap ############################################################

NGINX = shutil.which('nginx') or '/usr/sbin/nginx'
FCGIWRAP = shutil.which('fcgiwrap') or '/usr/sbin/fcgiwrap'

NGINX_CONF = """\
user {user} {group};
worker_processes 1;
worker_rlimit_nofile 4096;
pid {top}/run/nginx.pid;
error_log {top}/logs/nginx-error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log {top}/logs/nginx-access.log;
    client_body_temp_path {top}/nginx/body;
    fastcgi_temp_path {top}/nginx/fastcgi;
    proxy_temp_path {top}/nginx/proxy;
    uwsgi_temp_path {top}/nginx/uwsgi;
    scgi_temp_path {top}/nginx/scgi;
    map $ssl_client_s_dn $webjob_cert_cn {{
        default "";
        "~(^|,)CN=(?<cn>[^,]+)" $cn;
    }}
    map $remote_user $webjob_claimed_cn {{
        "" $webjob_cert_cn;
        default $remote_user;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name webjob.test;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        client_max_body_size 0;     # the CGI enforces PutLimit (455)
        location /cgi-client/ {{
            if ($webjob_claimed_cn != $webjob_cert_cn) {{
                return 403;
            }}
            auth_basic "WebJob";
            auth_basic_user_file {top}/htpasswd;
            root {top};
            fastcgi_pass unix:{socket};
            fastcgi_param GATEWAY_INTERFACE CGI/1.1;
            fastcgi_param SERVER_SOFTWARE nginx/$nginx_version;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
            fastcgi_param SERVER_NAME $server_name;
            fastcgi_param SERVER_ADDR $server_addr;
            fastcgi_param SERVER_PORT $server_port;
            fastcgi_param HTTPS on;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param SCRIPT_NAME $fastcgi_script_name;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param CONTENT_TYPE $content_type;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param REMOTE_ADDR $remote_addr;
            fastcgi_param REMOTE_PORT $remote_port;
            fastcgi_param REMOTE_USER $remote_user;
            fastcgi_param SSL_CLIENT_S_DN $ssl_client_s_dn;
            fastcgi_param SSL_CLIENT_S_DN_CN $webjob_cert_cn;
            fastcgi_param SSL_CLIENT_VERIFY $ssl_client_verify;
            fastcgi_param WEBJOB_PROPERTIES_FILE {top}/nph-webjob.cfg;
            fastcgi_param PATH {top}/bin:/usr/bin:/bin;
            fastcgi_param LD_LIBRARY_PATH {libdir};
        }}
    }}
}}
"""


def wait_for_unix_socket(path, timeout=60.0, proc=None):
    """Return once something accepts on the unix socket path; raise on
    timeout or when proc (if given) exits first."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
            return
        except OSError as exc:
            error = exc
        finally:
            sock.close()
        if proc is not None and proc.poll() is not None:
            raise RuntimeError('process exited (status %s) before listening '
                               'on %s' % (proc.returncode, path))
        if time.monotonic() > deadline:
            raise RuntimeError('nothing listens on %s after %.0f s: %s'
                               % (path, timeout, error))
        time.sleep(0.02)     # poll interval while waiting on the socket


def drop_to(user):
    """A preexec_fn that makes the child run as user (from root)."""
    def demote():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    return demote


class NginxServer(CgiSite):
    """nginx (TLS, client certificate, auth_basic) in front of fcgiwrap on
    a unix socket, which runs cgi-client/webjob.cgi (parsed-header mode);
    both are children of this process, workers and CGI run as www-data."""

    def __init__(self, scratch, python, pki, users=DEFAULT_USERS):
        CgiSite.__init__(self, scratch, python, users, prefix='nginx-')
        self.pki = pki
        self.socket = os.path.join(self.top, 'fcgi', 'fcgiwrap.sock')
        os.makedirs(os.path.join(self.top, 'nginx'))
        os.makedirs(os.path.dirname(self.socket))
        os.chown(os.path.dirname(self.socket), self.www.pw_uid,
                 self.www.pw_gid)
        self.conf = os.path.join(self.top, 'nginx.conf')
        self.port = None
        self.fcgiwrap = self.proc = None
        self._start_fcgiwrap()
        self._start_nginx()

    def _start_fcgiwrap(self):
        env = {'PATH': '%s/bin:/usr/bin:/bin' % self.top,
               'LD_LIBRARY_PATH': self.libdir}
        with open(os.path.join(self.top, 'logs', 'fcgiwrap'), 'wb') as out:
            self.fcgiwrap = subprocess.Popen(
                [FCGIWRAP, '-c', '4', '-s', 'unix:' + self.socket],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=self.top, preexec_fn=drop_to(self.www),
                start_new_session=True)
        try:
            wait_for_unix_socket(self.socket, proc=self.fcgiwrap)
        except RuntimeError as exc:
            stop_process(self.fcgiwrap)
            raise RuntimeError('fcgiwrap did not start: %s\n%s'
                               % (exc, self.error_log()))

    def _start_nginx(self):
        group = grp.getgrgid(self.www.pw_gid).gr_name
        for attempt in range(3):
            self.port = free_port()
            with open(self.conf, 'w') as conf:
                conf.write(NGINX_CONF.format(
                    user=APACHE_USER, group=group, top=self.top,
                    port=self.port, cert=self.pki.path('server-chain.pem'),
                    key=self.pki.path('server.key'),
                    ca=self.pki.path('ca.crt'), socket=self.socket,
                    libdir=self.libdir))
            if self._launch([NGINX, '-c', self.conf, '-p', self.top + '/',
                             '-e', os.path.join(self.top, 'logs',
                                                'nginx-error.log'),
                             '-g', 'daemon off;'], [self.port], 'nginx',
                            attempt):
                return

    @property
    def cgi_url(self):
        """The parsed-header CGI over HTTPS."""
        return 'https://%s:%d%s' % (LOOPBACK, self.port, PARSED_CGI_PATH)

    def error_log(self):
        return self.read_logs('stdout', 'nginx-error.log', 'fcgiwrap',
                              'nginx-access.log')

    def stop(self):
        for proc in (self.proc, self.fcgiwrap):
            if proc is not None:
                stop_process(proc)
        self.proc = self.fcgiwrap = None


_NGINXES = []


@pytest.fixture(scope='session')
def nginx_server(pki):
    """The session's nginx + fcgiwrap (see NginxServer), the CGI on
    NEWEST_PY.  Needs root, nginx, fcgiwrap and htpasswd: fails, never
    skips, without them."""
    fail_without('nginx', NGINX, FCGIWRAP, 'htpasswd')
    scratch = tempfile.mkdtemp(prefix='webjob-nginx-')
    os.chmod(scratch, 0o755)
    server = None
    try:
        server = NginxServer(scratch, NEWEST_PY, pki)
        _NGINXES.append(server)
        yield server
    finally:
        if server is not None:
            server.stop()
            _NGINXES.remove(server)
        shutil.rmtree(scratch, ignore_errors=True)


# Fleet: simulated queue clients ##############################################

QUEUE_VERSION = 'webjob+1.0.0+ssl+dsv+64+bit'
QUEUE_SYSTEM = 'x86_64+Linux+6.18.0-1-amd64'


def queue_query(client, filename, lengths=None):
    text = 'VERSION=%s&SYSTEM=%s&CLIENTID=%s&FILENAME=%s&RUNTYPE=snapshot' % (
        QUEUE_VERSION, QUEUE_SYSTEM, client, filename)
    if lengths:
        text += '&STDOUT_LENGTH=%d&STDERR_LENGTH=%d&STDENV_LENGTH=%d' % lengths
    return text


def read_queue_entry(root, name):
    """The Key=Value lines of queue entry 'CLIENT/NUMBER' under a
    BaseDirectory (jobqueues/CLIENT/NUMBER.job), by the server's reader."""
    import nph_webjob
    client, number = name.split('/')
    return nph_webjob.read_key_values(os.path.join(
        str(root), 'jobqueues', client, number + '.job'))


def queue_exchange(port, method, query, body=b'', job_id=None):
    """One WebJob request on a new connection: (status, Job-Id, body)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
    headers = {'Content-Type': 'application/octet-stream',
               'Content-Length': str(len(body))}
    if job_id:
        headers['Job-Id'] = job_id
    try:
        conn.request(method, '/cgi-client/nph-webjob.cgi?' + query, body,
                     headers)
        reply = conn.getresponse()
        return reply.status, reply.getheader('Job-Id'), reply.read()
    finally:
        conn.close()


def simulated_client(port, client):
    """What webjob.py --job does, in a thread: JOB, GET, PUT (a result with
    KidStatus=0); the Job-Id.  Also used by bench_webjob.py."""
    status, job_id, reply = queue_exchange(port, 'JOB', queue_query(
        client, 'default'))
    if status != 200:
        raise RuntimeError('%s: JOB answered %d' % (client, status))
    fields = dict(line.split('=', 1) for line in reply.decode().splitlines())
    status, got, program = queue_exchange(port, 'GET', queue_query(
        client, fields['CommandAlias']), job_id=job_id)
    if (status, got) != (200, job_id):
        raise RuntimeError('%s: GET answered %d, Job-Id %s' % (client, status,
                                                               got))
    out = b'collected ' + client.encode() + b'\n'
    env = ('ClientId=%s\nJid=%s\nKidStatus=0\nGetError=NA\nRunError=NA\n'
           % (client, job_id)).encode()
    status, got, body = queue_exchange(port, 'PUT', queue_query(
        client, fields['CommandAlias'], (len(out), 0, len(env))), out + env,
        job_id)
    if status != 200:
        raise RuntimeError('%s: PUT answered %d' % (client, status))
    return job_id


def run_simulated_clients(port, clients, workers=12):
    """Run simulated clients on a few threads; the first failure is
    raised.  Also used by bench_webjob.py."""
    pending, errors = list(clients), []
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not pending or errors:
                    return
                client = pending.pop()
            try:
                simulated_client(port, client)
            except BaseException as exc:
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=worker) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# Load: fleets of simulated clients, all at once #############################

FLEET_PROGRAM = b'#!/bin/sh\necho "job $1 of the fleet"\n'


def fleet_out(number):
    """What job number of a fleet prints (and uploads as its .out)."""
    return ('job %d of the fleet\n' % number).encode()


def install_fleet_program(root):
    """profiles/common/commands/fleet.sh under a BaseDirectory."""
    write_file(os.path.join(str(root), 'profiles', 'common', 'commands',
                            'fleet.sh'), FLEET_PROGRAM, 0o755)


def _fleet_env(number, out):
    return ('Version=webjob 1.0.0\nClientId=client_1\nJid=NA\nKidStatus=0\n'
            'HashType=SHA256\nStdOutHash=%s\nStdErrHash=%s\nJob=%d\n' % (
                hashlib.sha256(out).hexdigest(),
                hashlib.sha256(b'').hexdigest(), number)).encode()


async def _fleet_exchange(target, request):
    """One request on its own connection; (status, fields, body)."""
    host, port, path, context, auth = target
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context,
        server_hostname='webjob.test' if context else None)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b'\r\n\r\n')
        lines = head.decode('latin-1').split('\r\n')
        fields = dict(line.split(': ', 1) for line in lines[1:] if line)
        if 'Content-Length' in fields:
            body = await reader.readexactly(int(fields['Content-Length']))
        else:                   # Connection: close ends the body
            body = await reader.read()
        return int(lines[0].split()[1]), fields, body
    finally:
        writer.close()


def _fleet_head(target, method, query, extra=''):
    host, port, path, context, auth = target
    if auth:
        extra += 'Authorization: Basic %s\r\n' % base64.b64encode(
            auth.encode()).decode()
    return ('%s %s?%s HTTP/1.1\r\nHost: %s:%d\r\n%sConnection: close\r\n'
            '\r\n' % (method, path, query, host, port, extra)).encode()


async def _fleet_job(target, number):
    """GET fleet.sh, then PUT what it prints: the PUT's status, or why the
    job failed."""
    status, fields, body = await _fleet_exchange(target, _fleet_head(
        target, 'GET', queue_query('client_1', 'fleet.sh')))
    if status != 200 or body != FLEET_PROGRAM:
        return 'GET %d' % status
    out = fleet_out(number)
    env = _fleet_env(number, out)
    lengths = (len(out), 0, len(env))
    status, fields, body = await _fleet_exchange(target, _fleet_head(
        target, 'PUT', queue_query('client_1', 'fleet.sh', lengths),
        'Job-Id: %s\r\nContent-Type: application/octet-stream\r\n'
        'Content-Length: %d\r\n' % (fields['Job-Id'], sum(lengths)))
        + out + env)
    return status


def simulate_fleet(port, count, path='/cgi-client/nph-webjob.cgi',
                   context=None, auth=None):
    """count simulated clients started at once in this one process
    (asyncio), each a GET then a PUT as client_1; [(PUT status or the
    error, seconds the job took)] by job number.  context: an SSLContext
    (server name webjob.test); auth: 'user:password' for Basic.  Also used
    by bench_webjob.py."""
    target = (LOOPBACK, port, path, context, auth)

    async def timed(number):
        started = time.monotonic()
        try:
            outcome = await _fleet_job(target, number)
        except (OSError, EOFError, ValueError, KeyError,
                asyncio.IncompleteReadError) as exc:
            outcome = '%s: %s' % (type(exc).__name__, exc)
        return outcome, time.monotonic() - started

    async def everyone():
        return await asyncio.gather(*[timed(n) for n in range(count)])

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(everyone())
    finally:
        loop.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach every running Apache's or nginx's logs to a failed test's
    report."""
    report = yield
    names = getattr(item, 'fixturenames', ())
    if report.failed and 'apache_server' in names:
        for server in _APACHES:
            report.sections.append(('Apache error_log (port %s)' % server.port,
                                    server.error_log()))
    if report.failed and 'nginx_server' in names:
        for server in _NGINXES:
            report.sections.append(('nginx and fcgiwrap logs (port %s)'
                                    % server.port, server.error_log()))
    return report


# Fault proxy #################################################################

class FaultPlan(object):
    """What the fault proxy does to one connection.

    request_cut / response_cut: forward that many bytes of the client's
    (request) or the server's (response) stream, then cut both sides; reset
    makes the cut an RST instead of a FIN.  answer: bytes to answer with
    after draining the request (head and Content-Length body), without
    contacting the server (a 503 from an overloaded front end).  on_cut:
    called (in the relay's thread) at the cut, before the sockets close,
    e.g. to kill and restart the server.
    """

    def __init__(self, request_cut=None, response_cut=None, reset=False,
                 answer=None, on_cut=None):
        self.request_cut = request_cut
        self.response_cut = response_cut
        self.reset = reset
        self.answer = answer
        self.on_cut = on_cut


class FaultProxy(object):
    """A TCP relay on loopback in front of a server, which carries out one
    queued FaultPlan per new connection (plain relaying once the queue is
    empty).  Protocol-blind: it works under TLS too, cutting the record
    stream.  self.cuts counts the connections it cut or answered;
    self.connections all it accepted.  Use as a context manager, or close().
    """

    def __init__(self, upstream_port, upstream_host=LOOPBACK):
        import collections
        import threading
        self.upstream = (upstream_host, upstream_port)
        self.plans = collections.deque()
        self.lock = threading.Lock()
        self.connections = self.cuts = 0
        self.traffic = []   # (request bytes, response bytes) per relayed one
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.thread = threading.Thread(target=self._accept_loop)
        self.thread.daemon = True
        self.thread.start()

    def url(self, path='/'):
        return 'http://%s:%d%s' % (LOOPBACK, self.port, path)

    def plan(self, *plans, **kwargs):
        """Queue FaultPlans (or one made from kwargs) for the next
        connections, in order."""
        with self.lock:
            self.plans.extend(plans or [FaultPlan(**kwargs)])

    def wait_traffic(self, count, timeout=30.0):
        """self.traffic once count relayed connections have ended."""
        deadline = time.monotonic() + timeout
        while len(self.traffic) < count and time.monotonic() < deadline:
            time.sleep(0.01)     # poll interval while the relay winds down
        return list(self.traffic)

    def pending(self):
        with self.lock:
            return len(self.plans)

    def _accept_loop(self):
        import threading
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                plan = self.plans.popleft() if self.plans else None
            thread = threading.Thread(target=self._serve, args=(client, plan))
            thread.daemon = True
            thread.start()

    def _serve(self, client, plan):
        if plan is not None and plan.answer is not None:
            self._answer(client, plan)
            return
        try:
            server = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            _close_quietly(client, reset=True)
            return
        try:
            self._relay(client, server, plan)
        finally:
            _close_quietly(client)
            _close_quietly(server)

    def _relay(self, client, server, plan):
        """Copy both ways in one thread (select), so a cut closes sockets
        no other thread is blocked on; every wait is bounded."""
        import selectors
        cuts = [None, None] if plan is None else [plan.request_cut,
                                                  plan.response_cut]
        done = [0, 0]
        peers = {client: (server, 0), server: (client, 1)}
        for sock in (client, server):
            sock.settimeout(120)
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                selector.register(sock, selectors.EVENT_READ)
            reading = 2
            while reading:
                events = selector.select(timeout=120)
                if not events:
                    break                       # idle for two minutes
                for key, _ in events:
                    src = key.fileobj
                    dst, side = peers[src]
                    cut = cuts[side]
                    if cut is not None and done[side] >= cut:
                        self._cut(plan, client, server)
                        return
                    try:
                        data = src.recv(65536 if cut is None else
                                        min(65536, cut - done[side]))
                        if not data:
                            selector.unregister(src)
                            reading -= 1
                            dst.shutdown(socket.SHUT_WR)
                            continue
                        dst.sendall(data)
                        done[side] += len(data)
                    except OSError:
                        reading = 0
                        break
                    if cut is not None and done[side] >= cut:
                        self._cut(plan, client, server)
                        return
        with self.lock:
            self.traffic.append(tuple(done))

    def _cut(self, plan, client, server):
        with self.lock:
            self.cuts += 1
        if plan.on_cut is not None:
            plan.on_cut()
        _close_quietly(client, reset=plan.reset)
        _close_quietly(server, reset=True)

    def _answer(self, client, plan):
        """Read the request head and its Content-Length body, answer, close."""
        data = b''
        client.settimeout(60)
        try:
            while b'\r\n\r\n' not in data and len(data) < 65536:
                chunk = client.recv(65536)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b'\r\n\r\n')
            length = 0
            for line in head.split(b'\r\n')[1:]:
                name, _, value = line.partition(b':')
                if name.strip().lower() == b'content-length':
                    length = int(value.strip() or 0)
            left = length - len(body)
            while left > 0:
                chunk = client.recv(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            with self.lock:
                self.cuts += 1
            client.sendall(plan.answer)
        except OSError:
            pass
        _close_quietly(client)

    def close(self):
        self.closed = True
        close_listener(self.listener, self.thread)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def close_listener(listener, thread):
    """Close a listening socket and end the thread accepting on it: closing
    alone leaves a thread blocked in accept() on it, still listening."""
    _close_quietly(listener)        # the shutdown wakes accept() on Linux
    thread.join(30)
    assert not thread.is_alive(), 'the accepting thread did not end'


def _close_quietly(sock, reset=False):
    import struct
    try:
        if reset:               # close() then sends an RST, not a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            struct.pack('ii', 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def answer_503(reason=b'Service Unavailable'):
    """What an overloaded front end answers: a 503 with no body."""
    return (b'HTTP/1.1 503 ' + reason + b'\r\nContent-Length: 0\r\n'
            b'Connection: close\r\n\r\n')


@pytest.fixture
def fault_proxy():
    """Factory: fault_proxy(upstream_port) starts a FaultProxy in front of
    a server's port; all are closed at teardown."""
    proxies = []

    def start(upstream_port, upstream_host=LOOPBACK):
        proxy = FaultProxy(upstream_port, upstream_host)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()


# Squid #######################################################################

SQUID = shutil.which('squid') or '/usr/sbin/squid'
SQUID_NCSA = '/usr/lib/squid/basic_ncsa_auth'
SQUID_CONF = """\
http_port {host}:{port}
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log
coredump_dir {dir}
cache deny all
cache_mem 8 MB
shutdown_lifetime 0 seconds
pinger_enable off
forwarded_for delete
via off
{auth}
acl to_loopback dst 127.0.0.1/32
http_access {access} to_loopback{users}
http_access deny all
"""
SQUID_AUTH = """\
auth_param basic program {helper} {dir}/passwd
auth_param basic realm webjob-test-proxy
acl users proxy_auth REQUIRED"""


class SquidProxy(object):
    """A real Squid on a loopback port with a config of its own.

    access: 'allow' or 'deny' (a proxy that refuses every request); users:
    ((name, password), ...) to require Basic proxy authentication.
    """

    def __init__(self, folder, access='allow', users=()):
        self.dir = str(folder)
        os.makedirs(self.dir, exist_ok=True)
        auth = ''
        if users:
            with open(os.path.join(self.dir, 'passwd'), 'w') as handle:
                for name, password in users:
                    handle.write('%s:%s\n' % (name, _apr1(password)))
            auth = SQUID_AUTH.format(helper=SQUID_NCSA, dir=self.dir)
        if os.getuid() == 0:        # squid drops to its own user
            owner = pwd.getpwnam('proxy')
            for path in [self.dir] + [os.path.join(self.dir, name)
                                      for name in os.listdir(self.dir)]:
                os.chown(path, owner.pw_uid, owner.pw_gid)
        for attempt in range(3):
            self.port = free_port()
            conf = os.path.join(self.dir, 'squid.conf')
            with open(conf, 'w') as handle:
                handle.write(SQUID_CONF.format(
                    host=LOOPBACK, port=self.port, dir=self.dir, auth=auth,
                    access=access, users=' users' if users else ''))
            with open(os.path.join(self.dir, 'squid.out'), 'wb') as out:
                self.proc = subprocess.Popen(
                    [SQUID, '-N', '-f', conf], stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            try:
                wait_for_port(LOOPBACK, self.port, timeout=30, proc=self.proc)
                return
            except RuntimeError:
                stop_process(self.proc)
                if attempt == 2:
                    raise RuntimeError('squid did not start: %s' % self.log())

    def url(self, userinfo=''):
        return 'http://%s%s:%d/' % (userinfo, LOOPBACK, self.port)

    def log(self):
        out = []
        for name in ('squid.out', 'cache.log', 'access.log'):
            try:
                with open(os.path.join(self.dir, name), 'rb') as handle:
                    out.append(handle.read().decode('utf-8', 'replace'))
            except OSError:
                pass
        return '\n'.join(out)

    def access_lines(self, count=0, timeout=10.0):
        """access.log's request lines (not the port probes' empty ones),
        once there are at least count."""
        import time as clock
        deadline = clock.monotonic() + timeout
        while True:
            lines = [line for line in wait_for_lines(os.path.join(
                self.dir, 'access.log'), 0) if 'transaction-end-before' not
                in line]
            if len(lines) >= count or clock.monotonic() > deadline:
                return lines
            clock.sleep(0.01)    # poll interval while Squid writes its log

    def stop(self):
        stop_process(self.proc)


def _apr1(password):
    """An htpasswd -m (apr1) hash, made by openssl."""
    return subprocess.run(['openssl', 'passwd', '-apr1', password],
                          stdout=subprocess.PIPE, check=True
                          ).stdout.decode().strip()


@pytest.fixture
def squid_proxy():
    """Factory: squid_proxy(access='allow', users=()) starts a SquidProxy;
    all are stopped at teardown.  Its folder is outside pytest's private
    tmp tree: Squid runs as the proxy user."""
    fail_without('squid', SQUID)
    started = []

    def start(access='allow', users=()):
        folder = tempfile.mkdtemp(prefix='webjob-squid-')
        os.chmod(folder, 0o755)
        proxy = SquidProxy(folder, access, users)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
        shutil.rmtree(proxy.dir, ignore_errors=True)
