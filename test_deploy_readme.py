"""The README's command blocks, run as written.

Every fenced block of README.md preceded by `<!-- readme-test: NAME -->` is
run here with `sh -e` (or, with `<!-- readme-test: NAME > PATH -->`, written
to PATH), after replacing the placeholders by this test's folders, loopback
address and free ports, and nothing else.  A line ending in `&` starts a
server: the rest of the block runs once it listens, as it would for someone
typing it.  The convention is documented in the README's maintainer
section.  Needs root (Apache, nginx, fcgiwrap, useradd), like the other
deployment tests.
"""

import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import (HERE, LOOPBACK, fail_without, free_port, wait_for_lines,
                      wait_for_port, wait_for_unix_socket)

README = os.path.join(HERE, 'README.md')
MARKER = re.compile(r'^<!-- readme-test: (?P<name>[\w-]+)(?: > (?P<path>\S+))?'
                    r' -->\n```[\w-]*\n(?P<body>.*?)^```$', re.M | re.S)
PLACEHOLDER = re.compile(r'\b(TOP|BASE|PKI|CLIENT|BACKUP|MODULES|HOST|SSLPORT|'
                         r'PORT)\b')
QUICK_START_PORT = 8080              # sample.cfg's, implied by a bare 'serve'
QUICK_START_LOCK = '/tmp/webjob-test-port-8080.lock'
BLOCK_TIME_LIMIT = 300               # seconds: a deadline, not a sync
TESTED_SECTIONS = ('## Quick start', '## Production deployment',
                   '## Daily operation')
KNOWN_BLOCKS = {
    'quick-start', 'quick-start-port', 'install', 'pki', 'locker',
    'install-cgi', 'apache-conf', 'apache-start', 'client', 'fcgiwrap',
    'nginx-conf', 'nginx-start', 'standalone-user', 'standalone-unit',
    'daily-check', 'logrotate-conf', 'logrotate', 'backup'}


def read_blocks():
    """{name: (path or None, body)} of README.md's marked blocks."""
    with open(README, encoding='utf-8') as handle:
        text = handle.read()
    blocks = {}
    for match in MARKER.finditer(text):
        assert match.group('name') not in blocks, \
            'README: block %s is marked twice' % match.group('name')
        blocks[match.group('name')] = (match.group('path'),
                                       match.group('body'))
    return blocks


class Site(object):
    """One run through the README: folders, ports, what it started."""

    def __init__(self, scratch):
        self.scratch = scratch
        self.folders = {name: os.path.join(scratch, name.lower())
                        for name in ('TOP', 'BASE', 'PKI', 'CLIENT', 'BACKUP')}
        self.values = dict(self.folders, MODULES='/usr/lib/apache2/modules',
                           HOST=LOOPBACK, PORT=str(free_port()),
                           SSLPORT=str(free_port()))
        self.opt = os.path.join(scratch, 'opt-webjob')
        self.fcgi = os.path.join(scratch, 'fcgi')
        self.tmp = os.path.join(scratch, 'tmp')
        os.mkdir(self.tmp)
        self.started = []            # Popen of the sh that ran a '&' line
        self.stops = []              # argv that stop a daemon it started
        self.blocks = read_blocks()

    def substitute(self, text):
        text = text.replace('/opt/webjob', self.opt)
        text = text.replace('/run/webjob-fcgi', self.fcgi)
        return PLACEHOLDER.sub(lambda m: self.values[m.group(1)], text)

    def write(self, name):
        """Write a '> PATH' block; return the path."""
        path, body = self.blocks[name]
        assert path, 'README: block %s has no "> PATH"' % name
        path = self.substitute(path)
        with open(path, 'w') as handle:
            handle.write(self.substitute(body))
        return path

    def run(self, name, cwd=None, wait=None, env=None):
        """Run block name; after a line ending in '&', call wait() before
        the rest.  Returns the output of its last part."""
        path, body = self.blocks[name]
        assert path is None, 'README: block %s is a file, not commands' % name
        parts = re.split(r'(?<=&)\n', self.substitute(body))
        environment = dict(os.environ, TMPDIR=self.tmp)
        environment.update(env or {})
        output = b''
        for part in parts:
            if not part.strip():
                continue
            if part.rstrip().endswith('&'):
                log = os.path.join(self.scratch, '%s.%d.log' % (
                    name, len(self.started)))
                with open(log, 'wb') as out:
                    proc = subprocess.Popen(
                        ['sh', '-e', '-c', part], cwd=cwd or self.scratch,
                        env=environment, stdin=subprocess.DEVNULL,
                        stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True)
                self.started.append(proc)
                assert proc.wait(timeout=BLOCK_TIME_LIMIT) == 0, part
                wait(log)
                continue
            result = subprocess.run(
                ['sh', '-e', '-c', part], cwd=cwd or self.scratch,
                env=environment, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                timeout=BLOCK_TIME_LIMIT)
            assert result.returncode == 0, 'README block %s failed (%d):\n%s' % (
                name, result.returncode, result.stdout.decode('utf-8',
                                                              'replace'))
            output = result.stdout
        return output.decode('utf-8', 'replace')

    def cleanup(self):
        """Stop the daemons, then every process group a '&' line left."""
        for argv in self.stops:
            subprocess.run(argv, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
        for proc in self.started:
            kill_group(proc)
        self.started = []


def kill_group(proc, timeout=30.0):
    """SIGTERM the process group proc leads (proc may be gone, the group
    not), SIGKILL what is left after timeout; return once it is empty."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + timeout
        try:
            os.killpg(proc.pid, signum)
            while time.monotonic() < deadline:
                proc.poll()          # INFO: reap the leader, or it lingers
                os.killpg(proc.pid, 0)
                time.sleep(0.05)     # poll interval while the group exits
        except ProcessLookupError:
            return


@pytest.fixture
def site():
    scratch = tempfile.mkdtemp(prefix='webjob-readme-')
    os.chmod(scratch, 0o755)     # www-data and webjob must reach into it
    made = Site(scratch)
    try:
        yield made
    finally:
        made.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)


def groups_in(base):
    """The .rdy names in base/incoming."""
    return sorted(name for name in os.listdir(os.path.join(base, 'incoming'))
                  if name.endswith('.rdy'))


def prepare_locker(site):
    """The blocks every deployment shares: install, PKI, locker."""
    site.run('install', cwd=HERE)
    site.run('pki')
    site.run('locker')


def check_daily_operation(site):
    """Daily operation's blocks against the locker one job filled."""
    base = site.folders['BASE']
    out = site.run('daily-check')
    assert re.search(r'^\S+ \S+ client_1 hostname.sh server_1_\S+ 0 ', out,
                     re.M), out
    assert 'verify: 1 groups, 4 files in the manifest, 0 problems\n' in out
    site.write('logrotate-conf')
    log = os.path.join(base, 'logfiles', 'nph-webjob.log')
    with open(log, 'rb') as handle:
        before = handle.read()
    site.run('logrotate')
    with open(os.path.join(base, 'logfiles', 'nph-webjob.log.1'), 'rb') as h:
        assert h.read() == before
    assert not os.path.exists(log)
    site.run('backup')
    assert groups_in(os.path.join(site.folders['BACKUP'], 'check')) == \
        groups_in(base)


# The quick start ##############################################################

def quick_start_folder(site):
    """A fresh folder holding the three files the quick start names."""
    folder = os.path.join(site.scratch, 'quick')
    os.mkdir(folder)
    for name in ('webjob.py', 'nph_webjob.py', 'sample.cfg'):
        shutil.copy(os.path.join(HERE, name), folder)
    return folder


def test_readme_marks_exactly_the_blocks_this_file_runs():
    assert set(read_blocks()) == KNOWN_BLOCKS


@pytest.mark.parametrize('section', TESTED_SECTIONS)
def test_every_fenced_block_of_a_tested_section_is_marked(section):
    """A command block added to these sections without a marker would be
    the one that drifts."""
    with open(README, encoding='utf-8') as handle:
        text = handle.read()
    start = text.index('\n%s\n' % section)
    part = text[start:text.index('\n## ', start + 1)]
    unmarked = [match.group(0) for match in re.finditer(
        r'^(?!<!-- readme-test: ).*\n```[\w-]*\n', part, re.M)
        if not part[:match.start()].count('\n```') % 2]
    assert unmarked == []


def wait_for_serve(log, port):
    """Until the serve started in the background says it listens on port
    (a server of someone else's on that port must not pass for it)."""
    wait_for_lines(log, 1, timeout=60)
    with open(log, 'rb') as handle:
        first = handle.readline().decode('utf-8', 'replace')
    assert 'listening on http://127.0.0.1:%d/' % port in first, first


def port_is_free(port):
    probe = socket.socket()
    try:
        return probe.connect_ex((LOOPBACK, port)) != 0
    finally:
        probe.close()


def test_readme_quick_start_on_a_fresh_folder(site):
    """Port 8080 is the quick start's own: suites sharing this machine take
    turns on it through a lock file, and wait for it to be free."""
    import fcntl
    folder = quick_start_folder(site)
    with open(QUICK_START_LOCK, 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        deadline = time.monotonic() + BLOCK_TIME_LIMIT
        while not port_is_free(QUICK_START_PORT):
            assert time.monotonic() < deadline, 'port 8080 stays taken'
            time.sleep(0.5)      # poll interval: someone else's server
        try:
            site.run('quick-start', cwd=folder, wait=lambda log: wait_for_serve(
                log, QUICK_START_PORT))
        finally:
            site.cleanup()
    base = os.path.join(folder, 'webjob-server')
    assert len(groups_in(base)) == 1
    assert sorted(os.listdir(os.path.join(base, 'profiles'))) == ['client_1']


def test_readme_quick_start_on_another_port_with_the_isolated_client(site):
    folder = quick_start_folder(site)
    port = free_port()
    path, body = site.blocks['quick-start-port']
    site.blocks['quick-start-port'] = (path, body.replace('8081', str(port)))
    site.run('quick-start-port', cwd=folder,
             wait=lambda log: wait_for_serve(log, port))
    assert len(groups_in(os.path.join(folder, 'webjob-server'))) == 1


# Production: Apache, nginx, standalone ########################################

def test_readme_production_path_under_apache(site):
    fail_without('Apache', 'apache2', 'htpasswd', 'openssl')
    prepare_locker(site)
    site.run('install-cgi')
    site.write('apache-conf')
    top = site.folders['TOP']
    site.stops.append(['apache2', '-f', os.path.join(top, 'httpd.conf'), '-k',
                       'stop'])
    site.run('apache-start')
    wait_for_port(LOOPBACK, int(site.values['SSLPORT']), timeout=60)
    site.run('client')
    assert len(groups_in(site.folders['BASE'])) == 1
    check_daily_operation(site)


def test_readme_production_path_under_nginx(site):
    fail_without('nginx + fcgiwrap', 'nginx', 'fcgiwrap', 'htpasswd',
                 'openssl')
    prepare_locker(site)
    site.run('install-cgi')
    socket_path = os.path.join(site.fcgi, 'fcgiwrap.sock')
    site.run('fcgiwrap', wait=lambda log: wait_for_unix_socket(
        socket_path, timeout=60))
    conf = site.write('nginx-conf')
    site.stops.append(['nginx', '-c', conf, '-p', site.folders['TOP'] + '/',
                       '-s', 'stop'])
    site.run('nginx-start')
    wait_for_port(LOOPBACK, int(site.values['SSLPORT']), timeout=60)
    path, body = site.blocks['client']
    site.blocks['client'] = (path, body.replace('/nph-webjob.cgi',
                                                '/webjob.cgi'))
    site.run('client')
    assert len(groups_in(site.folders['BASE'])) == 1


def unit_settings(path):
    """{key: value} of a systemd unit's [Service] section."""
    settings, section = {}, None
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line.startswith('['):
                section = line
            elif section == '[Service]' and '=' in line:
                key, value = line.split('=', 1)
                settings[key] = value
    return settings


def test_readme_production_path_standalone_under_systemd_user(site):
    """The unit's ExecStart, run as its User= (no systemd here)."""
    fail_without('the standalone recipe', 'htpasswd', 'openssl', 'useradd',
                 'runuser')
    prepare_locker(site)
    site.run('standalone-user')
    unit = unit_settings(site.write('standalone-unit'))
    user = pwd.getpwnam(unit['User'])
    assert user.pw_uid != 0
    log_path = os.path.join(site.scratch, 'serve.log')
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen(
            ['runuser', '-u', unit['User'], '--'] + shlex.split(
                unit['ExecStart']), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    site.started.append(proc)
    wait_for_port(LOOPBACK, int(site.values['SSLPORT']), timeout=60,
                  proc=proc)
    site.run('client')
    rdy = groups_in(site.folders['BASE'])
    assert len(rdy) == 1
    stat = os.stat(os.path.join(site.folders['BASE'], 'incoming', rdy[0]))
    assert stat.st_uid == user.pw_uid
    kill_group(proc)             # SIGTERM to runuser and the server
    with open(log_path, 'rb') as log:
        assert b'nph_webjob: stopped\n' in log.read()
