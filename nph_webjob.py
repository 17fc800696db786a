#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""nph_webjob.py -- the WebJob server: serve programs, keep every upload.

One request handler behind three front ends:

    nph-webjob.cgi  (a link to this file)   CGI, non-parsed-header: writes
                                            its own 'HTTP/1.1 <code> <reason>'
    <any other name>.cgi                    CGI, parsed-header ('Status:')
    python3 nph_webjob.py serve [--root DIR] [--bind ADDR] [--port N]
                                [--config FILE]
                                            standalone threaded HTTP/1.1

GET returns profiles/<CLIENTID>/commands/<FILENAME> (else the same name in
profiles/common/commands) with a Job-Id.  PUT stores the uploaded stdout,
stderr and environment record as a new group incoming/<ClientId>_<time>_
<NNNNN>_<FILENAME>.{out,err,env}, then .rdy last.  Every request appends one
line to logfiles/nph-webjob.log.  Clients are hostile: every query value is
checked against a whitelist before it reaches a path, nothing is written
outside BaseDirectory, and an existing group is never overwritten.
"""

import os
import sys

__version__ = '1.0.0'
__license__ = 'BSD-3-Clause'
__all__ = ['STATUS_REASONS', 'SERVER_CONTROLS', 'HTTPStatusError', 'Site',
           'Exchange', 'load_site', 'parse_query', 'process_request',
           'send_response', 'log_exchange', 'handle_request', 'run_cgi',
           'make_layout', 'serve', 'main']

# INFO: the config reader and the CLIENTID/FILENAME validators are shared
# with the client.  The CGI runs through a link (nph-webjob.cgi), so look
# beside the real file.  Only os and sys are imported here; everything else
# is imported where it is used, because a CGI pays start-up on every request.
_HERE = os.path.dirname(os.path.realpath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import webjob  # noqa: E402


###############################################################################
# Constants ###################################################################
###############################################################################

PROGRAM = 'nph_webjob'

#: Status codes and reasons: the nph-ftimes 3.13 table (protocol.md 1.4)
#: less its FTimes-only 250 and 460, plus 401 for the standalone server's
#: own Basic authentication.  Clients key on the number.
STATUS_REASONS = {
    200: 'OK',
    251: 'Link Test OK',
    252: 'Upload Already Stored',
    401: 'Unauthorized',
    404: 'Not Found',
    405: 'Method Not Allowed',
    450: 'Invalid Query',
    451: 'File Already Exists',
    452: 'Username Undefined',
    453: 'Username-ClientId Mismatch',
    454: 'Content-Length Undefined',
    455: 'Content-Length Exceeds Limit',
    456: 'Content-Length Mismatch',
    457: 'File Not Available',
    500: 'Internal Server Error',
    503: 'Service Unavailable',
    550: 'Internal Server Initialization Error',
}

#: nph-webjob.cfg controls: (name, kind, default), kinds as in webjob.py.
SERVER_CONTROLS = (
    ('BaseDirectory', 'path', '/var/webjob'),
    ('CapContentLength', 'yn', False),
    ('EnableLogging', 'yn', True),
    ('GetHookCommandLine', 'text', ''),
    ('GetHookEnable', 'yn', False),
    ('GetHookSuffix', 'text', ''),
    ('GetHookTimeLimit', 'uint', 60),
    ('GetTriggerCommandLine', 'text', ''),
    ('GetTriggerEnable', 'yn', False),
    ('IntegrityEnable', 'yn', True),
    ('MaxContentLength', 'uint', 100000000),
    ('OverrideDirectory', 'text', ''),
    ('PutTriggerCommandLine', 'text', ''),
    ('PutTriggerEnable', 'yn', False),
    ('RequireMatch', 'yn', True),
    ('RequireUser', 'yn', True),
    ('ServerId', 'text', 'server_1'),
    ('TriggerTimeLimit', 'uint', 600),
    ('UseGMT', 'yn', False),
)

#: Controls an override file may set.  Those in TIGHTEN_ONLY may only move
#: the safe way: a yn control from N to Y, MaxContentLength downwards.
OVERRIDABLE = frozenset((
    'CapContentLength', 'GetHookCommandLine', 'GetHookEnable', 'GetHookSuffix',
    'GetHookTimeLimit', 'GetTriggerCommandLine', 'GetTriggerEnable',
    'IntegrityEnable', 'MaxContentLength', 'PutTriggerCommandLine',
    'PutTriggerEnable', 'RequireMatch', 'RequireUser', 'TriggerTimeLimit'))
TIGHTEN_ONLY = ('CapContentLength', 'IntegrityEnable', 'MaxContentLength',
                'RequireMatch', 'RequireUser')
OVERRIDE_FOLDER = 'clients'             # <config folder>/clients/<ClientId>/
CLIENT_OVERRIDE = 'nph-webjob.cfg'      # .../<ClientId>/nph-webjob.cfg
COMMAND_OVERRIDES = 'commands'          # .../commands/<FILENAME>.cfg

#: Command lines and the %tokens each may use (%% is a literal '%').
#: Trigger tokens: ready file, job id, client id, file name, the three
#: stream files, client address.  GetHook: the stored program (%tp).
TRIGGER_TOKENS = ('rdy', 'jid', 'cid', 'cmd', 'out', 'err', 'env', 'ip')
HOOK_TOKENS = ('tp', 'jid', 'cid', 'cmd', 'ip')
COMMAND_CONTROLS = (('GetTrigger', TRIGGER_TOKENS),
                    ('PutTrigger', TRIGGER_TOKENS),
                    ('GetHook', HOOK_TOKENS))
TRIGGER_LOG_NAME = 'nph-webjob-trigger.log'
TRIGGER_PID_LABEL = 'KidPid'            # the .env's name for a child's pid
TRIGGER_ENVIRONMENT = ('PATH', 'TZ', 'LANG', 'LC_ALL')   # all they inherit
SUPERVISOR_ENVIRONMENT = ('LD_LIBRARY_PATH',)   # its interpreter may need
TRIGGER_VALUES = ('EnableLogging', 'TriggerTimeLimit', 'UseGMT')  # supervisor
SUPERVISE_COMMAND = 'supervise-trigger'  # internal: start_trigger's helper
SUPERVISOR_START_LIMIT = 30             # seconds for it to read and detach
MAX_TRIGGER_ORDER = 1 << 20             # bytes of order it reads
ADDRESS_CHARS = frozenset('0123456789abcdefABCDEF.:')

MANIFEST_NAME = 'nph-webjob-manifest.sha256'
UPLOAD_INDEX = 'nph-webjob-uploads'     # logfiles/<this>/: uploads by Job-Id
UPLOAD_WAIT = 10                # seconds a re-send waits for its first copy
FLAG_EXTENSION = 'bad'                  # sidecar: the hashes differ
HASH_NAMES = ('MD5', 'SHA1', 'SHA256')  # the client's HashType values
ASIDE_HASHES = ('MD5',)                 # taken while copying, with SHA256
THREAD_HASH_MIN = 4 << 20               # larger streams hash those aside
MAX_ENV_SCAN = 1 << 16                  # bytes of .env searched for hashes

DEFAULT_CONFIG = '/var/webjob/config/nph-webjob/nph-webjob.cfg'
CONFIG_VARIABLE = 'WEBJOB_PROPERTIES_FILE'
LOG_NAME = 'nph-webjob.log'
LAYOUT = ('incoming', 'logfiles', 'profiles')
COMMON_PROFILE = 'common'

BLOCK_SIZE = 1 << 20            # 1 MiB: body reads, writes and copies
SMALL_BODY = 1 << 16            # GET bodies up to this go out with the head
_O_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)   # never write through a link
SERIAL_MODULUS = 100000         # the 5-digit NNNNN of job ids and groups
NAME_MAX = 255                  # longest file name in incoming/
MAX_QUERY = 4096                # longest QUERY_STRING looked at
MAX_SIGNATURE = 255             # WebJob-Payload-Signature (client limit)
MAX_MESSAGE = 1024              # longest ErrorMessage in a log line
IDLE_TIMEOUT = 120              # standalone: seconds a socket may stay silent

#: Query parameters, in the client's order (protocol.md 1.1 and 2).
GET_PARAMETERS = ('VERSION', 'SYSTEM', 'CLIENTID', 'FILENAME', 'RUNTYPE')
LENGTH_PARAMETERS = ('STDOUT_LENGTH', 'STDERR_LENGTH', 'STDENV_LENGTH')
PUT_PARAMETERS = GET_PARAMETERS + LENGTH_PARAMETERS
STREAM_EXTENSIONS = ('out', 'err', 'env')       # body order: out, err, env
GROUP_EXTENSIONS = STREAM_EXTENSIONS + ('rdy', 'bad')

_ALNUM = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'
VERSION_CHARS = frozenset(_ALNUM + '_ (),./:+-')
SYSTEM_CHARS = frozenset(_ALNUM + '_ (),./:+#~-')
SERVER_ID_CHARS = frozenset(_ALNUM + '_-')
JOB_ID_CHARS = frozenset(_ALNUM + '_.-')
BASE64_CHARS = frozenset(_ALNUM + '+/=')
HEX_DIGITS = frozenset('0123456789abcdefABCDEF')

DEFAULT_ROOT = 'webjob-server'
DEFAULT_BIND = '127.0.0.1'
DEFAULT_PORT = 8080
SAMPLE_CLIENT = 'client_1'
SAMPLE_PROGRAM = ('hostname.sh', b'#!/bin/sh\nhostname\ndate\n')

USAGE = """\
Usage: nph_webjob.py serve [--root DIR] [--bind ADDR] [--port N]
                           [--config FILE] [--tls-cert FILE --tls-key FILE
                           [--client-ca FILE]] [--htpasswd FILE] [--force]
       nph_webjob.py verify [--root DIR | --config FILE]
       nph_webjob.py list [--root DIR | --config FILE] [--client ID]
                          [--since YYYY-MM-DD[ HH:MM[:SS]]]
       nph_webjob.py install-cgi PATH [--config FILE]
       nph_webjob.py {-h|--help}
       nph-webjob.cgi                     (as a CGI: GATEWAY_INTERFACE is set)
"""


###############################################################################
# Errors ######################################################################
###############################################################################

class HTTPStatusError(Exception):
    """A request ends with this status (a STATUS_REASONS key); the message
    goes to the log only, never to the client."""

    def __init__(self, status, message):
        Exception.__init__(self, message)
        self.status = status
        self.message = message


def write_stderr(message):
    """One line on stderr (Apache's error_log under CGI), never failing."""
    webjob.write_stderr(message, PROGRAM)


###############################################################################
# Command lines (triggers and GetHook) ########################################
###############################################################################

def shell_quote(value):
    """One /bin/sh word holding value exactly (single quotes)."""
    return "'%s'" % value.replace("'", "'\"'\"'")


def expand_tokens(text, values):
    """Replace each %token by its value as one quoted shell word; '%%' is a
    literal '%'.  Only the server's own validated names are ever values.

    :raises ValueError: for a '%' that starts no known token.
    """
    names = sorted(values, key=len, reverse=True)
    out = []
    start = 0
    while True:
        index = text.find('%', start)
        if index < 0:
            out.append(text[start:])
            return ''.join(out)
        out.append(text[start:index])
        if text.startswith('%', index + 1):
            out.append('%')
            start = index + 2
            continue
        for name in names:
            if text.startswith(name, index + 1):
                out.append(shell_quote(values[name]))
                start = index + 1 + len(name)
                break
        else:
            raise ValueError('unknown token at [%s]; expected %s or %%%%' % (
                text[index:index + 8], ', '.join('%' + n for n in sorted(
                    values))))


def command_environment():
    """The environment of a trigger or hook: a few server variables only,
    never the request's (under CGI, HTTP_* are the client's words)."""
    env = dict((name, os.environ[name]) for name in TRIGGER_ENVIRONMENT
               if name in os.environ)
    env.setdefault('PATH', '/usr/local/bin:/usr/bin:/bin')
    return env


###############################################################################
# Config ######################################################################
###############################################################################

class Site(object):
    """The server's settings: config values, folders, job-id and group numbers.

    next_serial() gives the 5-digit number of job ids and incoming groups:
    the PID under CGI (one request per process), a counter when standalone.
    """

    def __init__(self, values, next_serial=None, clock=None,
                 config_dir=None):
        import time  # late import: start-up time
        self.values = values
        self.base = values['BaseDirectory']
        self.incoming, self.logfiles, self.profiles = (
            os.path.join(self.base, name) for name in LAYOUT)
        self.log_path = os.path.join(self.logfiles, LOG_NAME)
        self.trigger_log_path = os.path.join(self.logfiles, TRIGGER_LOG_NAME)
        self.manifest_path = os.path.join(self.logfiles, MANIFEST_NAME)
        self.override_dir = values['OverrideDirectory'] or os.path.join(
            config_dir or os.path.join(self.base, 'config'), OVERRIDE_FOLDER)
        self.next_serial = next_serial or os.getpid
        self.clock = clock or time.time

    def with_values(self, values):
        """The same site with other control values (an override's)."""
        clone = object.__new__(Site)
        clone.__dict__.update(self.__dict__)
        clone.values = values
        return clone

    def check_layout(self):
        """550 unless profiles/ and logfiles/ are readable, incoming/ writable.

        :raises HTTPStatusError: 550, naming the folder.
        """
        wanted = ((self.profiles, os.R_OK | os.X_OK, 'readable'),
                  (self.logfiles, os.X_OK, 'searchable'),
                  (self.incoming, os.W_OK | os.X_OK, 'writable'))
        for path, mode, what in wanted:
            if not os.path.isdir(path) or not os.access(path, mode):
                raise HTTPStatusError(550, 'Directory (%s) does not exist or '
                                      'is not %s' % (path, what))


def load_site(path, required=True, defaults=None, overrides=None, **seams):
    """Read nph-webjob.cfg (webjob.read_config grammar) into a Site.

    A missing file is an error when required, else the defaults apply.
    defaults replace table defaults for controls the file does not set;
    overrides win over the file (the standalone --root).

    :raises HTTPStatusError: 550 naming file:line:control.
    """
    values = dict((name, default) for name, kind, default in SERVER_CONTROLS)
    values['_where'] = {}
    try:
        if path and (required or os.path.exists(path)):
            if '-' in path.split(','):
                raise webjob.PropertiesError('%s: standard input is not a '
                                             'config file here' % path)
            values = webjob.read_config(path, SERVER_CONTROLS)
    except webjob.PropertiesError as exc:
        raise HTTPStatusError(550, 'Config: %s' % exc)
    for name, value in (defaults or {}).items():
        if name not in values['_where']:
            values[name] = value
    values.update(overrides or {})
    where = values['_where']
    server_id = values['ServerId']
    if not (0 < len(server_id) <= 64 and set(server_id) <= SERVER_ID_CHARS):
        raise HTTPStatusError(550, 'Config: %s: ServerId = [%s]: expected '
                              '1-64 letters, digits, "_" or "-"' % (
                                  where.get('ServerId', path), server_id))
    if not os.path.isabs(values['BaseDirectory']):
        raise HTTPStatusError(550, 'Config: %s: BaseDirectory = [%s]: '
                              'expected an absolute path' % (
                                  where.get('BaseDirectory', path),
                                  values['BaseDirectory']))
    if values['OverrideDirectory'] and \
            not os.path.isabs(values['OverrideDirectory']):
        raise HTTPStatusError(550, 'Config: %s: OverrideDirectory = [%s]: '
                              'expected an absolute path' % (
                                  where.get('OverrideDirectory', path),
                                  values['OverrideDirectory']))
    try:
        check_commands(values, where, path or '-')
    except ValueError as exc:
        raise HTTPStatusError(550, 'Config: %s' % exc)
    seams.setdefault('config_dir', os.path.dirname(os.path.abspath(path))
                     if path else None)
    return Site(values, **seams)


def check_commands(values, where, path):
    """Each enabled trigger or hook has a command line whose %tokens exist;
    GetHookSuffix is empty or a '.name' a file name may end with.

    :raises ValueError: 'file:line: Control = [value]: why'.
    """
    for prefix, tokens in COMMAND_CONTROLS:
        enable, control = prefix + 'Enable', prefix + 'CommandLine'
        text = values[control]
        if values[enable] and not text.strip():
            raise ValueError('%s: %s = [Y]: %s is required' % (
                where.get(enable, path), enable, control))
        try:
            expand_tokens(text, dict((name, '') for name in tokens))
        except ValueError as exc:
            raise ValueError('%s: %s = [%s]: %s' % (
                where.get(control, path), control, text, exc))
    suffix = values['GetHookSuffix']
    if suffix and not (suffix.startswith('.') and len(suffix) <= 32 and
                       webjob.is_program_name('x' + suffix)):
        raise ValueError('%s: GetHookSuffix = [%s]: expected "." then letters,'
                         ' digits, "_", "-", "." or "+"' % (
                             where.get('GetHookSuffix', path), suffix))


def apply_overrides(site, client_id, filename):
    """The site as this client and command see it: the global config, then
    <OverrideDirectory>/<ClientId>/nph-webjob.cfg, then
    <OverrideDirectory>/<ClientId>/commands/<FILENAME>.cfg, later winning.

    Both names are validated query values.  Absent files cost one stat each.

    :raises HTTPStatusError: 550 for a file that cannot be read, sets a
        control that is not overridable, or loosens a tighten-only one.
    """
    folder = os.path.join(site.override_dir, client_id)
    values = None
    for path in (os.path.join(folder, CLIENT_OVERRIDE),
                 os.path.join(folder, COMMAND_OVERRIDES, filename + '.cfg')):
        if not override_exists(path):
            continue
        values = merge_override(dict(values or site.values), path)
    return site if values is None else site.with_values(values)


def override_exists(path):
    """False for a name that is not there (or could not be); 550 when the
    override cannot even be looked at, so a client never slips past it."""
    import errno  # late import: start-up time
    try:
        os.stat(path)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            return False
        raise HTTPStatusError(550, 'Override: %s: %s' % (path, exc.strerror))


def merge_override(values, path):
    """Apply one override file to values (a copy); return it."""
    table = webjob.build_control_table(SERVER_CONTROLS)
    found, where = {}, {}
    try:
        webjob.read_config_file(path, table, found, where, None, ())
    except webjob.PropertiesError as exc:
        raise HTTPStatusError(550, 'Override: %s' % exc)
    for name in sorted(found):
        value, here = found[name], where[name]
        if name not in OVERRIDABLE:
            raise HTTPStatusError(550, 'Override: %s: %s: not overridable '
                                  '(global only)' % (here, name))
        if name in TIGHTEN_ONLY and loosens(name, values[name], value):
            raise HTTPStatusError(550, 'Override: %s: %s = [%s]: may only '
                                  'tighten (in effect: %s)' % (
                                      here, name, show_value(value),
                                      show_value(values[name])))
        values[name] = value
    values['_where'] = dict(values.get('_where', {}), **where)
    try:
        check_commands(values, values['_where'], path)
    except ValueError as exc:
        raise HTTPStatusError(550, 'Override: %s' % exc)
    return values


def loosens(name, current, wanted):
    """True when wanted is less safe than current."""
    if name == 'MaxContentLength':
        return wanted > current
    return current and not wanted


def show_value(value):
    """A control value as the config file spells it."""
    if value is True or value is False:
        return 'Y' if value else 'N'
    return str(value)


###############################################################################
# Request validation ##########################################################
###############################################################################

def is_version(value):
    """VERSION: 'webjob' then 1-64 of [A-Za-z0-9_ (),./:+-]."""
    rest = value[6:]
    return (value.startswith('webjob') and 0 < len(rest) <= 64
            and set(rest) <= VERSION_CHARS)


def is_system(value):
    """SYSTEM: uname machine, sysname and release; 1-128 plain characters."""
    return 0 < len(value) <= 128 and set(value) <= SYSTEM_CHARS


def _is_ascii_digits(value):
    """1-20 ASCII digits (str.isdigit alone accepts other scripts' digits)."""
    return len(value) <= 20 and webjob.is_digits(value)


def is_job_id(value):
    """A Job-Id we accept back and write into .rdy: 1-255 of [A-Za-z0-9_.-]."""
    return 0 < len(value) <= 255 and set(value) <= JOB_ID_CHARS


#: Every query parameter and its anchored check (whole value, no escapes).
QUERY_CHECKS = {
    'VERSION': is_version,
    'SYSTEM': is_system,
    'CLIENTID': webjob.is_client_id,
    'FILENAME': webjob.is_program_name,
    'RUNTYPE': lambda value: value in ('snapshot', 'linktest'),
    'STDOUT_LENGTH': _is_ascii_digits,
    'STDERR_LENGTH': _is_ascii_digits,
    'STDENV_LENGTH': _is_ascii_digits,
}


def decode_query_value(text):
    """Undo the client's HttpEscape: '+' is a space, then %xx; strict UTF-8.

    :raises ValueError: on a bad escape or bytes that are not UTF-8.
    """
    data = text.replace('+', ' ').encode('ascii')
    parts = data.split(b'%')
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or not set(part[:2].decode('ascii')) <= HEX_DIGITS:
            raise ValueError('bad %-escape')
        out.append(bytes((int(part[:2], 16),)) + part[2:])
    return b''.join(out).decode('utf-8')


def parse_query(query, names):
    """Split and check a query that must hold exactly the given parameters.

    Any order is accepted; a missing, duplicate, unknown, badly escaped or
    invalid parameter is refused.  Returns {NAME: decoded value}.

    :raises HTTPStatusError: 450, saying which parameter failed.
    """
    shown = webjob.one_line(query[:256])
    if len(query) > MAX_QUERY:
        raise HTTPStatusError(450, 'Invalid query string: longer than %d '
                              'characters (%s...)' % (MAX_QUERY, shown))
    found = {}
    for item in query.split('&') if query else ():
        name, equals, raw = item.partition('=')
        try:
            if not equals:
                raise ValueError('no "="')
            if name not in names or name in found:
                raise ValueError('duplicate' if name in found else 'unknown')
            value = decode_query_value(raw)
            if not QUERY_CHECKS[name](value):
                raise ValueError('value not allowed')
        except (ValueError, UnicodeError) as exc:
            raise HTTPStatusError(450, 'Invalid query string: %s: %s (%s)' % (
                webjob.one_line(name[:32]) or '-', exc, shown))
        found[name] = value
    missing = [name for name in names if name not in found]
    if missing:
        raise HTTPStatusError(450, 'Invalid query string: %s missing (%s)'
                              % (', '.join(missing), shown))
    return found


###############################################################################
# Integrity ###################################################################
###############################################################################

class StreamDigests(object):
    """The digests of one uploaded stream, fed the blocks the copy loop has.

    SHA-256 (the manifest's) is taken in the loop.  The HashType out and
    err must match is named only by the .env, the last stream, so the
    client's default, MD5, is taken too (aside); above THREAD_HASH_MIN bytes
    a helper thread takes it (hashlib releases the GIL), so a spare core
    pays.  A SHA1 upload is hashed again from the file (check_stream_hash).
    """

    def __init__(self, length, aside=()):
        import hashlib  # late import: PUT with IntegrityEnable only
        self.sha256 = hashlib.sha256()
        self.others = [(name, hashlib.new(name.lower())) for name in aside]
        self.queue = self.thread = None
        if self.others and length > THREAD_HASH_MIN:
            import queue  # late import: large uploads only
            import threading  # late import: large uploads only
            self.queue = queue.Queue(8)
            self.thread = threading.Thread(target=self.hash_aside)
            self.thread.daemon = True
            self.thread.start()

    def update(self, chunk):
        self.sha256.update(chunk)
        if self.queue is not None:
            self.queue.put(chunk)
        else:
            for name, digest in self.others:
                digest.update(chunk)

    def hash_aside(self):
        """The helper thread: the aside digests of each block until None."""
        while True:
            chunk = self.queue.get()
            if chunk is None:
                return
            for name, digest in self.others:
                digest.update(chunk)

    def finish(self):
        """{HashType: lower-case hex} once every block is in."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        found = dict((name, digest.hexdigest()) for name, digest
                     in self.others)
        found['SHA256'] = self.sha256.hexdigest()
        return found


def sha256_hex(data):
    import hashlib  # late import: PUT with IntegrityEnable only
    return hashlib.sha256(data).hexdigest()


def hash_file(path, names):
    """{name: hex} of a file in one streamed pass; hashlib names as in
    HASH_NAMES."""
    import hashlib  # late import: tools only
    digests = [(name, hashlib.new(name.lower())) for name in names]
    with open(path, 'rb') as handle:
        while True:
            chunk = handle.read(BLOCK_SIZE)
            if not chunk:
                break
            for name, digest in digests:
                digest.update(chunk)
    return dict((name, digest.hexdigest()) for name, digest in digests)


def read_key_values(path, limit=MAX_ENV_SCAN):
    """Key=Value lines from the first limit bytes of a file (.env, .rdy,
    .bad); later keys win.  Undecodable bytes are kept escaped."""
    with open(path, 'rb') as handle:
        data = handle.read(limit)
    found = {}
    for line in data.decode('utf-8', 'surrogateescape').splitlines():
        key, equals, value = line.partition('=')
        if equals:
            found[key.strip()] = value.strip()
    return found


def read_declared_hashes(env_path):
    """(HashType, StdOutHash, StdErrHash) from an .env; None for a value
    that is absent, NA or not a hex digest of that type."""
    values = read_key_values(env_path)
    hash_type = values.get('HashType', '').upper()
    if hash_type not in HASH_NAMES:
        return None, None, None
    size = {'MD5': 32, 'SHA1': 40, 'SHA256': 64}[hash_type]

    def digest(key):
        value = values.get(key, '').lower()
        return value if len(value) == size and set(value) <= HEX_DIGITS \
            else None
    return hash_type, digest('StdOutHash'), digest('StdErrHash')


def check_upload_hashes(declared, out_sums, err_sums):
    """Compare the declared hashes with the received ones.

    Returns (log note, .bad sidecar bytes or None).  A stream whose hash is
    not declared is unchecked, not wrong: the client may be old or failed.
    """
    hash_type, out_hash, err_hash = declared
    if hash_type is None or (out_hash is None and err_hash is None):
        return '', None
    wrong = []
    lines = ['HashType=%s\n' % hash_type]
    for key, want, sums in (('StdOutHash', out_hash, out_sums),
                            ('StdErrHash', err_hash, err_sums)):
        got = sums[hash_type]
        lines.append('%s=%s\n' % (key, want or 'NA'))
        lines.append('%sReceived=%s\n' % (key[:-4], got))
        if want is not None and want != got:
            wrong.append(key)
    if not wrong:
        return '; hashes match (%s)' % hash_type, None
    lines.append('Result=mismatch: %s\n' % ' '.join(wrong))
    return ('; hash mismatch: %s (%s) differ from the bytes received; '
            'kept, flagged in .%s' % (' and '.join(wrong), hash_type,
                                      FLAG_EXTENSION),
            ''.join(lines).encode('ascii'))


###############################################################################
# Storage #####################################################################
###############################################################################

def copy_stream(stdin, fd, length, digests=None):
    """Move exactly length bytes from stdin to fd (None: discard), 1 MiB at
    a time, feeding each block to digests when given.  Returns (bytes
    copied, why it stopped short or '')."""
    done = 0
    while done < length:
        try:
            chunk = stdin.read(min(BLOCK_SIZE, length - done))
        except OSError as exc:      # includes socket.timeout on 3.6-3.9
            return done, 'read error: %s' % (exc.strerror or exc)
        if not chunk:
            return done, 'end of input'
        if fd is not None:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        if digests is not None:
            digests.update(chunk)
        done += len(chunk)
    return done, ''


def write_stream(path, stdin, length, digests=None):
    """Write the next length bytes of the body to a new file, fsynced.

    :raises HTTPStatusError: 456 when the body ends early.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW,
                 0o644)
    try:
        done, why = copy_stream(stdin, fd, length, digests)
        if done != length:
            raise HTTPStatusError(456, 'Stream length (%d) does not equal '
                                  'number of bytes received (%d) for %s: %s'
                                  % (length, done, os.path.basename(path),
                                     why))
        os.fsync(fd)
    finally:
        os.close(fd)


def claim_group(incoming, prefix, suffix, first):
    """Take the first free group name from serial number first on.

    The claim is '<group>.lck' made with O_EXCL; a name whose lock or any
    group file exists is skipped, so nothing is ever overwritten.
    Returns (group, lock path).

    :raises HTTPStatusError: 451 when all 100000 numbers are taken.
    """
    import errno  # late import: start-up time
    for step in range(SERIAL_MODULUS):
        group = '%s%05d%s' % (prefix, (first + step) % SERIAL_MODULUS, suffix)
        lock = os.path.join(incoming, group + '.lck')
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o644))
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                continue
            raise
        if any(os.path.lexists(os.path.join(incoming, group + '.' + ext))
               for ext in GROUP_EXTENSIONS):
            os.unlink(lock)
            continue
        return group, lock
    raise HTTPStatusError(451, 'File (%s*%s) already exists for every serial '
                          'number' % (prefix, suffix))


def store_upload(site, stdin, prefix, suffix, lengths, job_id):
    """Store out, err and env as a new group, then .rdy; return (group,
    integrity note for the log message).

    Each file is written under a dot-prefixed temporary name, fsynced and
    renamed; .rdy ('Jid=<job id>\\n') comes last and the folder is fsynced
    after it.  With IntegrityEnable the streams are hashed as they are
    copied, checked against the .env's StdOutHash/StdErrHash (a mismatch
    adds the .bad sidecar, never drops evidence) and every file's SHA-256
    goes to the manifest before .rdy.  On any failure every file of the
    group is removed.

    :raises HTTPStatusError: 456 for a short body, 451 when no name is free.
    """
    import io  # late import: start-up time
    incoming = site.incoming
    checking = site.values['IntegrityEnable']
    group, lock = claim_group(incoming, prefix, suffix, site.next_serial())
    made = []
    note = ''
    try:
        temps, sums = [], []
        for ext, length in zip(STREAM_EXTENSIONS, lengths):
            temp = os.path.join(incoming, '.%s.%s' % (group, ext))
            made.append(temp)
            digests = StreamDigests(length, ASIDE_HASHES if ext != 'env'
                                    else ()) if checking else None
            try:
                write_stream(temp, stdin, length, digests)
            finally:
                if digests is not None:
                    sums.append(digests.finish())
            temps.append((temp, os.path.join(incoming, group + '.' + ext)))
        record = ('Jid=%s\n' % job_id).encode('ascii')
        manifest = []
        if checking:
            declared = read_declared_hashes(temps[2][0])
            for n in (0, 1):
                if declared[0] is not None and declared[0] not in sums[n]:
                    sums[n].update(hash_file(temps[n][0], [declared[0]]))
            note, flag = check_upload_hashes(declared, sums[0], sums[1])
            manifest = [(sums[n]['SHA256'], group + '.' + ext)
                        for n, ext in enumerate(STREAM_EXTENSIONS)]
            if flag is not None:
                temp = os.path.join(incoming, '.%s.%s' % (group,
                                                          FLAG_EXTENSION))
                made.append(temp)
                write_stream(temp, io.BytesIO(flag), len(flag))
                temps.append((temp, os.path.join(
                    incoming, group + '.' + FLAG_EXTENSION)))
                manifest.append((sha256_hex(flag),
                                 group + '.' + FLAG_EXTENSION))
            manifest.append((sha256_hex(record), group + '.rdy'))
        for temp, final in temps:
            os.rename(temp, final)
            made.append(final)
        if manifest and not append_log(site.manifest_path, ''.join(
                '%s  %s\n' % pair for pair in manifest)):
            note += '; manifest (%s) not written' % MANIFEST_NAME
        temp = os.path.join(incoming, '.%s.rdy' % group)
        made.append(temp)
        write_stream(temp, io.BytesIO(record), len(record))
        os.rename(temp, os.path.join(incoming, group + '.rdy'))
        made = []               # INFO: complete from here on; keep it all
        fsync_folder(incoming)
        return group, note
    finally:
        for path in made:
            try:
                os.unlink(path)
            except OSError:
                pass
        os.unlink(lock)


def fsync_folder(path):
    """Make renames in a folder durable (after .rdy, the commit point)."""
    import errno  # late import: start-up time
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:   # EINVAL: this file system cannot
            raise
    finally:
        os.close(fd)


###############################################################################
# Logging #####################################################################
###############################################################################

def log_field(value):
    """One whitespace-free log field: '-' when empty, else escaped text."""
    text = webjob.one_line('' if value is None else value)
    return text.replace(' ', '\\x20') if text else '-'


def format_log_line(exchange, use_gmt):
    """The manual's 12 fields: DateTime JobId RemoteUser RemoteAddress
    RequestMethod ClientId ClientFilename ContentLength ServerContentLength
    Duration ReturnStatus -- ErrorMessage (DateTime is two tokens)."""
    import time  # late import: start-up time
    when = (time.gmtime if use_gmt else time.localtime)(exchange.stop)
    fields = (exchange.job_id, exchange.remote_user, exchange.remote_addr,
              exchange.method, exchange.client_id, exchange.filename,
              exchange.content_length, exchange.server_length,
              exchange.duration, exchange.status)
    message = webjob.one_line(exchange.message)[:MAX_MESSAGE]
    return '%s %s --%s\n' % (time.strftime('%Y-%m-%d %H:%M:%S', when),
                             ' '.join(log_field(f) for f in fields),
                             ' ' + message if message else '')


def append_log(path, line):
    """Append one line with a single write under flock(LOCK_EX); False if
    the log cannot be opened or written."""
    import fcntl  # late import: start-up time
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line.encode('ascii'))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)            # INFO: closing releases the flock


def log_exchange(exchange, site=None):
    """Write the request's log line: to the log, or stderr when that fails.

    With no usable config (550) the log's place is unknown: stderr.
    """
    import time  # late import: start-up time
    site = site or exchange.site
    exchange.stop = site.clock() if site is not None else time.time()
    exchange.duration = int(time.monotonic() - exchange.started)
    if site is not None and not site.values['EnableLogging']:
        return
    line = format_log_line(exchange, site and site.values['UseGMT'])
    if site is None or not append_log(site.log_path, line):
        write_stderr('log unavailable: %s' % line)


###############################################################################
# Triggers ####################################################################
###############################################################################

def command_tokens(exchange):
    """Token values common to triggers and GetHook: job id, client id, file
    name and client address, each validated or empty."""
    address = exchange.remote_addr
    if not (len(address) <= 64 and set(address) <= ADDRESS_CHARS):
        address = ''
    return {'jid': exchange.job_id or '', 'cid': exchange.client_id or '',
            'cmd': exchange.filename or '', 'ip': address}


def trigger_tokens(site, exchange):
    """All trigger token values; the group's paths are empty on a GET."""
    values = command_tokens(exchange)
    for ext in ('rdy',) + STREAM_EXTENSIONS:
        values[ext] = os.path.join(site.incoming, exchange.group + '.' + ext) \
            if exchange.group else ''
    return values


def run_triggers(exchange):
    """After a successful GET (200) or PUT (200, not a linktest), start the
    method's trigger when enabled; never raises, never waits for it."""
    site = exchange.site
    if site is None or exchange.status != 200:
        return
    prefix = {'GET': 'GetTrigger', 'PUT': 'PutTrigger'}.get(exchange.method)
    if prefix is None or not site.values[prefix + 'Enable']:
        return
    fields = (exchange.job_id, exchange.method, exchange.client_id,
              exchange.filename)
    try:
        command = expand_tokens(site.values[prefix + 'CommandLine'],
                                trigger_tokens(site, exchange))
        start_trigger(site, fields, command)
    except Exception as exc:    # the answer is out: log, never fail here
        log_trigger(site, fields, None, 'failed', 'Trigger not started: '
                    '%s: %s' % (type(exc).__name__, exc))


def start_trigger(site, fields, command):
    """Hand the trigger to a supervisor that is a fresh interpreter, and
    wait only until it has detached (it forks once and its parent exits).

    This process is not forked: in the threaded standalone server a forked
    child can deadlock on a lock another thread held (Python 3.12 and newer
    warn about it).  The supervisor starts in its own session with every
    standard stream on /dev/null except the order it reads, so a CGI's
    pipes to the web server close as soon as the answer is out.
    """
    import json  # late import: triggers only
    import subprocess  # late import: triggers only
    order = json.dumps({
        'command': command, 'fields': list(fields), 'incoming': site.incoming,
        'log': site.trigger_log_path,
        'values': dict((name, site.values[name]) for name in TRIGGER_VALUES)})
    proc = subprocess.Popen(
        [sys.executable, '-I', '-S', os.path.realpath(__file__),
         SUPERVISE_COMMAND], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, cwd=site.incoming,
        env=supervisor_environment(), start_new_session=True)
    try:
        proc.communicate(order.encode('utf-8'), timeout=SUPERVISOR_START_LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise OSError('the supervisor did not detach within %d s'
                      % SUPERVISOR_START_LIMIT)
    if proc.returncode != 0:
        raise OSError('the supervisor failed to start (status %d)'
                      % proc.returncode)


def supervisor_environment():
    """The trigger's environment, plus what the interpreter itself may need
    to start (a Python built with a shared library outside the default
    path); the trigger gets command_environment() alone."""
    env = command_environment()
    for name in SUPERVISOR_ENVIRONMENT:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


class TriggerSite(object):
    """What a trigger's supervisor needs of the Site, from its order."""

    def __init__(self, order):
        import time  # late import: triggers only
        self.values = order['values']
        self.incoming = order['incoming']
        self.trigger_log_path = order['log']
        self.clock = time.time


def run_trigger_supervisor(stdin):
    """The supervisor's side of start_trigger: read the order, fork so the
    server's wait ends, and supervise the trigger in the child."""
    import json  # late import: triggers only
    import signal  # late import: triggers only
    import time  # late import: triggers only
    order = json.loads(stdin.read(MAX_TRIGGER_ORDER).decode('utf-8'))
    site, fields = TriggerSite(order), tuple(order['fields'])
    if os.fork():
        os._exit(0)
    try:
        detach_descriptors()
        supervise_trigger(site, fields, order['command'], signal, time)
    except BaseException as exc:
        try:
            log_trigger(site, fields, None, 'failed', 'Trigger not started: '
                        '%s' % exc)
        except BaseException:
            pass
    os._exit(0)


def detach_descriptors():
    """Standard streams to /dev/null, every other descriptor closed."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    try:
        fds = [int(name) for name in os.listdir('/proc/self/fd')]
    except OSError:
        fds = range(3, 1024)
    for fd in fds:
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass


def supervise_trigger(site, fields, command, signal, time):
    """Start the trigger in its own process group, log its start, wait for
    it (killing the group at TriggerTimeLimit) and log how it ended."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE,
                   signal.SIGALRM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    limit = site.values['TriggerTimeLimit']
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            os.chdir(site.incoming)
            os.execve('/bin/sh', ['/bin/sh', '-c', command],
                      command_environment())
        finally:
            os._exit(127)
    try:
        os.setpgid(pid, pid)    # INFO: both sides, whichever runs first
    except OSError:
        pass
    log_trigger(site, fields, pid, 'started', 'Command (%s)' % command)
    expired = []

    def expire(signum, frame):
        expired.append(signum)
        kill_group(pid)

    if limit:
        signal.signal(signal.SIGALRM, expire)
        signal.alarm(limit)
    status = os.waitpid(pid, 0)[1]    # retried after expire (PEP 475)
    signal.alarm(0)
    if expired:
        state, message = 'timeout', 'Signal (%d) to the process group when ' \
            'TriggerTimeLimit (%d s) expired' % (signal.SIGKILL, limit)
    elif os.WIFSIGNALED(status):
        state, message = 'killed', 'Signal (%d)' % os.WTERMSIG(status)
    else:
        state, message = 'finished', 'Exit status (%d)' % os.WEXITSTATUS(
            status)
    log_trigger(site, fields, pid, state, message)


def format_trigger_line(site, fields, pid, state, message):
    """The manual's 10 fields: Date Time JobId RequestMethod ClientId
    ClientFilename PidLabel Pid State -- Message."""
    import time  # late import: triggers only
    when = (time.gmtime if site.values['UseGMT'] else time.localtime)(
        site.clock())
    label = TRIGGER_PID_LABEL if pid is not None else None
    message = webjob.one_line(message)[:MAX_MESSAGE]
    return '%s %s --%s\n' % (
        time.strftime('%Y-%m-%d %H:%M:%S', when),
        ' '.join(log_field(f) for f in fields + (label, pid, state)),
        ' ' + message if message else '')


def log_trigger(site, fields, pid, state, message):
    """Append one trigger log line (one write, O_APPEND, flock)."""
    if not site.values['EnableLogging']:
        return
    line = format_trigger_line(site, fields, pid, state, message)
    if not append_log(site.trigger_log_path, line):
        write_stderr('trigger log unavailable: %s' % line)


###############################################################################
# Application #################################################################
###############################################################################

def certificate_user(environ):
    """The client certificate's CN as mod_ssl passes it (SSLOptions
    +StdEnvVars), for a CGI behind SSLVerifyClient without Basic auth;
    trusted only when mod_ssl says it verified the certificate."""
    if environ.get('SSL_CLIENT_VERIFY') != 'SUCCESS':
        return ''
    return environ.get('SSL_CLIENT_S_DN_CN', '')


class Exchange(object):
    """One request and its answer: what the log line and response need."""

    def __init__(self, environ):
        import time  # late import: start-up time
        self.started = time.monotonic()
        self.stop = self.duration = None
        self.environ = environ
        self.site = None
        self.method = environ.get('REQUEST_METHOD', '')
        self.remote_user = (environ.get('REMOTE_USER', '')
                            or certificate_user(environ))
        self.remote_addr = environ.get('REMOTE_ADDR', '')
        self.content_length = environ.get('CONTENT_LENGTH', '')
        header = environ.get('HTTP_JOB_ID', '')
        self.job_id = header if is_job_id(header) else None
        self.client_id = self.filename = None
        self.group = None        # the incoming group a PUT stored
        self.server_length = 0
        self.status = 500
        self.message = ''
        self.headers = []        # extra response fields, e.g. the signature
        self.body = None         # an open file for a GET 200
        self.body_length = 0


def process_request(environ, stdin, site=None):
    """Run one request to its answer; never raises.

    site None (CGI) reads the config named by $WEBJOB_PROPERTIES_FILE.  The
    PUT body is read from stdin.  Returns the Exchange, whose status,
    headers and body are ready for send_response.
    """
    exchange = Exchange(environ)
    try:
        if site is None:
            path = environ.get(CONFIG_VARIABLE)
            site = load_site(path or DEFAULT_CONFIG, required=bool(path))
        exchange.site = site
        site.check_layout()
        if exchange.method not in ('GET', 'PUT'):
            raise HTTPStatusError(405, 'Method (%s) not allowed'
                                  % webjob.one_line(exchange.method[:32]))
        names = GET_PARAMETERS if exchange.method == 'GET' else PUT_PARAMETERS
        query = parse_query(environ.get('QUERY_STRING', ''), names)
        exchange.client_id = query['CLIENTID']
        exchange.filename = query['FILENAME']
        site = exchange.site = apply_overrides(site, exchange.client_id,
                                               exchange.filename)
        check_user(site, exchange)
        if exchange.method == 'GET':
            serve_get(site, exchange)
        else:
            serve_put(site, exchange, query, stdin)
    except HTTPStatusError as exc:
        exchange.status, exchange.message = exc.status, exc.message
    except Exception as exc:    # last resort: a 500 and a log line, no trace
        exchange.status = 500
        exchange.message = 'Internal error: %s: %s' % (type(exc).__name__, exc)
    if exchange.status >= 300 and exchange.body is not None:
        exchange.body.close()
        exchange.body, exchange.body_length = None, 0
    return exchange


def check_user(site, exchange):
    """RequireUser (452) and RequireMatch (453, exact compare); RequireUser=N
    disables both, as in the original."""
    if not site.values['RequireUser']:
        return
    if not exchange.remote_user:
        raise HTTPStatusError(452, 'Remote user is undefined or null')
    if site.values['RequireMatch'] and \
            exchange.remote_user != exchange.client_id:
        raise HTTPStatusError(453, 'Remote user (%s) does not match client ID '
                              '(%s)' % (webjob.one_line(exchange.remote_user),
                                        exchange.client_id))


def make_job_id(site):
    """<ServerId>_<epoch>_<NNNNN>, e.g. server_1_1085355126_00723."""
    return '%s_%d_%05d' % (site.values['ServerId'], int(site.clock()),
                           site.next_serial() % SERIAL_MODULUS)


def serve_get(site, exchange):
    """Open the client's program (or the common one) for the response.

    :raises HTTPStatusError: 404 when neither exists, 457 when it exists
        but cannot be opened as a regular file.
    """
    import errno  # late import: start-up time
    import stat  # late import: start-up time
    exchange.job_id = make_job_id(site)
    stored = hooked_name(site.values, exchange.filename)
    tried = []
    for folder in (exchange.client_id, COMMON_PROFILE):
        shown = '/'.join(('profiles', folder, 'commands',
                          stored or exchange.filename))
        path = os.path.join(site.profiles, folder, 'commands',
                            stored or exchange.filename)
        tried.append(shown)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            raise HTTPStatusError(457, 'Requested file (%s) could not be '
                                  'opened (%s)' % (shown, exc.strerror))
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise HTTPStatusError(457, 'Requested file (%s) is not a regular '
                                  'file' % shown)
        if stored is not None:
            os.close(fd)
            run_get_hook(site, exchange, path, shown)
            return
        exchange.body = os.fdopen(fd, 'rb', 0)
        exchange.body_length = info.st_size
        signature = read_signature(path + '.sig')
        if signature:
            exchange.headers.append(('WebJob-Payload-Signature', signature))
        exchange.status, exchange.message = 200, 'Success'
        return
    raise HTTPStatusError(404, 'Requested file (%s) does not exist'
                          % ' or '.join(tried))


def hooked_name(values, filename):
    """The stored name GetHook turns into filename, or None without a hook:
    filename itself, or filename less GetHookSuffix when one is set (a
    request that lacks the suffix is served as usual)."""
    if not values['GetHookEnable']:
        return None
    suffix = values['GetHookSuffix']
    if not suffix:
        return filename
    if filename.endswith(suffix) and len(filename) > len(suffix):
        return filename[:-len(suffix)]
    return None


def run_get_hook(site, exchange, path, shown):
    """Serve GetHookCommandLine's standard output instead of the stored file.

    The output goes to an unlinked temporary file (never into memory) and is
    served from there once the hook exits 0 within GetHookTimeLimit; its
    whole process group is killed at the limit.

    :raises HTTPStatusError: 457 when the hook fails or runs out of time.
    """
    import subprocess  # late import: GetHook only
    import tempfile  # late import: GetHook only
    values = site.values
    command = expand_tokens(values['GetHookCommandLine'], dict(
        command_tokens(exchange), tp=path))
    limit = values['GetHookTimeLimit'] or None
    output = tempfile.TemporaryFile()
    errors = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(
            ['/bin/sh', '-c', command], stdin=subprocess.DEVNULL,
            stdout=output, stderr=errors, cwd=os.path.dirname(path),
            env=command_environment(), close_fds=True, start_new_session=True)
        try:
            status = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()
            raise HTTPStatusError(457, 'GetHook for %s killed when '
                                  'GetHookTimeLimit (%d s) expired'
                                  % (shown, limit))
        if status != 0:
            errors.seek(0)
            why = webjob.one_line(errors.read(256).decode('utf-8', 'replace'))
            raise HTTPStatusError(457, 'GetHook for %s failed: %s%s' % (
                shown, 'exit status (%d)' % status if status > 0 else
                'signal (%d)' % -status, ': ' + why if why else ''))
    except BaseException:
        output.close()
        raise
    finally:
        errors.close()
    exchange.body_length = os.fstat(output.fileno()).st_size
    output.seek(0)
    exchange.body = output
    exchange.status = 200
    exchange.message = 'Success: served GetHook output of %s' % shown


def kill_group(pid):
    """SIGKILL a process group; it may be gone already."""
    import signal  # late import: triggers and hooks only
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def read_signature(path):
    """The .sig beside a payload: one line of base64, at most 255 characters
    once stripped; None when absent or not in that form (DSV, 1.9)."""
    try:
        with open(path, 'rb') as handle:
            data = handle.read(MAX_SIGNATURE + 64).strip()
    except OSError:
        return None
    text = data.decode('ascii', 'replace')
    if 0 < len(text) <= MAX_SIGNATURE and set(text) <= BASE64_CHARS:
        return text
    return None


def serve_put(site, exchange, query, stdin):
    """Check the lengths, then store the upload (or discard a linktest).

    :raises HTTPStatusError: 454, 455, 456, 450 or 451.
    """
    exchange.job_id = exchange.job_id or make_job_id(site)
    length = exchange.content_length
    if not length:
        raise HTTPStatusError(454, 'Content length is undefined or null')
    if not _is_ascii_digits(length):
        raise HTTPStatusError(454, 'Content length (%s) is not a number'
                              % webjob.one_line(length[:32]))
    length = int(length)
    cap = site.values['MaxContentLength']
    if site.values['CapContentLength'] and length > cap:
        raise HTTPStatusError(455, 'Content length (%d) exceeds maximum '
                              'allowed length (%d)' % (length, cap))
    lengths = [int(query[name]) for name in LENGTH_PARAMETERS]
    if length != sum(lengths):
        raise HTTPStatusError(456, 'Content length (%d) does not equal sum of '
                              'individual stream lengths (%s)' % (
                                  length, ' + '.join(map(str, lengths))))
    if query['RUNTYPE'] == 'linktest':
        done, why = copy_stream(stdin, None, length)
        if done != length:
            raise HTTPStatusError(456, 'Content length (%d) does not equal '
                                  'number of bytes received (%d): %s'
                                  % (length, done, why))
        exchange.status, exchange.message = 251, 'Success'
        return
    import time  # late import: start-up time
    now = site.clock()
    stamp = time.strftime('%Y%m%d%H%M%S', (time.gmtime if site.values['UseGMT']
                                           else time.localtime)(now))
    prefix = '%s_%s_' % (exchange.client_id, stamp)
    suffix = '_' + exchange.filename
    if len(prefix) + 5 + len(suffix) + len('..env') > NAME_MAX:
        raise HTTPStatusError(450, 'Invalid query string: FILENAME too long '
                              'for a name in incoming/')
    store_once(site, exchange, stdin, prefix, suffix, lengths)


def store_once(site, exchange, stdin, prefix, suffix, lengths):
    """Store a PUT, or recognise a re-send of an upload already stored.

    A client that lost the answer to a PUT sends it again.  An upload that
    carries a Job-Id is identified by its ClientId and Job-Id, and is the
    same upload when FILENAME, the three lengths and the .env's bytes (which
    hold the job's StdOutHash and StdErrHash) are the same: a re-send is
    drained and answered 252, nothing stored; a different upload under a
    stored identity is refused with 451.  A copy flagged .bad does not
    count, so a clean re-send is stored beside it.  One index file per
    identity (logfiles/nph-webjob-uploads/) is locked while its upload is
    written, so a re-send that overtakes its first copy waits for it (503
    after UPLOAD_WAIT seconds).  Without a Job-Id: the original behaviour.
    """
    job_id = exchange.environ.get('HTTP_JOB_ID', '')
    if not is_job_id(job_id):
        exchange.group, note = store_upload(site, stdin, prefix, suffix,
                                            lengths, exchange.job_id)
        exchange.status, exchange.message = 200, 'Success' + note
        return
    fd = lock_upload_index(site, exchange.client_id, job_id)
    storing = False
    try:
        entry = read_key_values_fd(fd)
        if entry.get('State') == 'storing':     # its writer died mid-way
            entry = find_stored_upload(site, exchange, job_id)
        if entry.get('Group') and entry.get('Flagged') != 'Y':
            answer_resend(exchange, stdin, lengths, entry)
            return
        write_index(fd, [('ClientId', exchange.client_id),
                         ('JobId', job_id), ('State', 'storing')])
        storing = True
        exchange.group, note = store_upload(site, stdin, prefix, suffix,
                                            lengths, job_id)
        exchange.status, exchange.message = 200, 'Success' + note
        write_index(fd, upload_entry(site.incoming, exchange, job_id))
    except BaseException:
        if storing and exchange.group is None:    # nothing was stored
            write_index(fd, [])
        raise
    finally:
        os.close(fd)


def lock_upload_index(site, client_id, job_id):
    """Open and flock the index file of one upload identity.

    :raises HTTPStatusError: 503 while another request holds it too long.
    """
    import fcntl  # late import: PUT with a Job-Id only
    import hashlib  # late import: PUT with a Job-Id only
    import time  # late import: start-up time
    folder = os.path.join(site.logfiles, UPLOAD_INDEX)
    if not os.path.isdir(folder):
        os.makedirs(folder, 0o755, exist_ok=True)
    name = hashlib.sha256(('%s\n%s' % (client_id, job_id)).encode(
        'ascii')).hexdigest()[:40]
    fd = os.open(os.path.join(folder, name), os.O_RDWR | os.O_CREAT |
                 _O_NOFOLLOW, 0o644)
    give_up = time.monotonic() + UPLOAD_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > give_up:
                os.close(fd)
                raise HTTPStatusError(503, 'Upload with Job-Id (%s) is still '
                                      'being stored by another request'
                                      % job_id)
            time.sleep(0.05)    # the other request is writing its copy


def read_key_values_fd(fd):
    """Key=Value lines of an open index file."""
    data = os.pread(fd, MAX_ENV_SCAN, 0).decode('ascii', 'replace')
    return dict(line.partition('=')[::2] for line in data.splitlines()
                if '=' in line)


def write_index(fd, pairs):
    """Replace an index file's contents in place (it stays locked)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, ''.join('%s=%s\n' % pair for pair in pairs).encode(
        'ascii', 'replace'), 0)
    os.fsync(fd)


def upload_entry(incoming, exchange, job_id):
    """The index record of the group an upload was stored as."""
    path = os.path.join(incoming, exchange.group + '.')
    return [('ClientId', exchange.client_id), ('JobId', job_id),
            ('Filename', exchange.filename), ('Group', exchange.group),
            ('Lengths', ','.join(str(os.path.getsize(path + ext))
                                 for ext in STREAM_EXTENSIONS)),
            ('EnvSHA256', hash_file(path + 'env', ['SHA256'])['SHA256']),
            ('Flagged', 'Y' if os.path.exists(path + FLAG_EXTENSION)
             else 'N')]


def find_stored_upload(site, exchange, job_id):
    """After a crash mid-store: the complete group of this identity, found
    by its .rdy's Jid, as an index record; {} when there is none."""
    head = exchange.client_id + '_'
    tail = '_%s.rdy' % exchange.filename
    for name in sorted(os.listdir(site.incoming)):
        if name.startswith(head) and name.endswith(tail) and \
                read_key_values(os.path.join(site.incoming, name)).get(
                    'Jid') == job_id:
            exchange.group = name[:-4]
            try:
                return dict(upload_entry(site.incoming, exchange, job_id))
            finally:
                exchange.group = None
    return {}


def answer_resend(exchange, stdin, lengths, entry):
    """Drain a PUT whose identity is stored; 252 when it is the same
    upload, else 451.

    :raises HTTPStatusError: 456 for a short body, 451 for a different one.
    """
    import hashlib  # late import: re-sends only
    digest = hashlib.sha256()
    done, why = copy_stream(stdin, None, lengths[0] + lengths[1])
    if done == lengths[0] + lengths[1]:
        more, why = copy_stream(stdin, None, lengths[2], digest)
        done += more
    if done != sum(lengths):
        raise HTTPStatusError(456, 'Content length (%d) does not equal '
                              'number of bytes received (%d): %s'
                              % (sum(lengths), done, why))
    same = (entry.get('Filename') == exchange.filename and
            entry.get('Lengths') == ','.join(map(str, lengths)) and
            entry.get('EnvSHA256') == digest.hexdigest())
    if not same:
        raise HTTPStatusError(451, 'Job-Id (%s) is already stored as %s, '
                              'with other contents; refused'
                              % (entry.get('JobId'), entry.get('Group')))
    exchange.status = 252
    exchange.message = 'Success: a re-send of %s, already stored' % (
        entry.get('Group'))


def send_response(exchange, out, nph=True, extra_headers=()):
    """Write the status line, header block and body; return body bytes sent.

    nph: 'HTTP/1.1 <code> <reason>' plus Server; else 'Status: <code>
    <reason>' for a parsed-header CGI.  Answers other than a GET's 200 carry
    Content-Length: 0 and no body.  out needs write(); a plain socket wrapper
    with sendfile(file, offset, count) gets the body by sendfile.
    """
    status = exchange.status
    lines = [('HTTP/1.1 %d %s' if nph else 'Status: %d %s')
             % (status, STATUS_REASONS[status])]
    software = exchange.environ.get('SERVER_SOFTWARE')
    if nph and software:
        lines.append('Server: %s' % webjob.one_line(software))
    lines.extend('%s: %s' % pair for pair in extra_headers)
    lines.append('Content-Type: application/octet-stream')
    lines.append('Content-Length: %d' % exchange.body_length)
    if exchange.job_id and 200 <= status < 300:
        lines.append('Job-Id: %s' % exchange.job_id)
    lines.extend('%s: %s' % pair for pair in exchange.headers)
    head = ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')
    body, length = exchange.body, exchange.body_length
    try:
        if body is None:
            out.write(head)
        elif length <= SMALL_BODY:
            data = body.read(length)
            out.write(head + data)
            exchange.server_length = len(data)
        else:
            out.write(head)
            exchange.server_length = copy_body(body, length, out)
        if exchange.server_length != length:
            exchange.message += '; file changed: sent %d of %d bytes' % (
                exchange.server_length, length)
    except OSError as exc:
        exchange.message += '; response not delivered: %s' % (
            exc.strerror or exc)
    finally:
        if body is not None:
            body.close()
    return exchange.server_length


def copy_body(body, length, out):
    """Stream a file: socket sendfile when out offers it, else 1 MiB blocks."""
    sendfile = getattr(out, 'sendfile', None)
    if sendfile is not None:
        return sendfile(body, 0, length)
    done = 0
    while done < length:
        chunk = body.read(min(BLOCK_SIZE, length - done))
        if not chunk:
            break
        out.write(chunk)
        done += len(chunk)
    return done


def handle_request(environ, stdin, stdout, site=None, nph=True,
                   extra_headers=()):
    """The CGI-shaped whole: process, respond, log.  Returns the status."""
    exchange = process_request(environ, stdin, site)
    send_response(exchange, stdout, nph, extra_headers)
    log_exchange(exchange, site)
    stdout.flush()              # INFO: the answer leaves before any trigger
    run_triggers(exchange)
    return exchange.status


###############################################################################
# CGI front end ###############################################################
###############################################################################

def run_cgi(environ=None, stdin=None, stdout=None):
    """Answer the one request of a CGI process; NPH when the script's name
    starts with 'nph-' (SCRIPT_FILENAME, else argv[0])."""
    environ = os.environ if environ is None else environ
    script = environ.get('SCRIPT_FILENAME') or sys.argv[0]
    nph = os.path.basename(script).startswith('nph-')
    os.umask(0o022)
    stdout = stdout or sys.stdout.buffer
    handle_request(environ, stdin or sys.stdin.buffer, stdout, nph=nph,
                   extra_headers=[('Connection', 'close')] if nph else ())
    stdout.flush()
    return 0


CGI_STUB = """\
#!%(python)s -IS
# %(name)s: written by 'nph_webjob.py install-cgi'.  It imports the server
# from %(folder)s, whose byte code that command compiled: a script
# run directly is compiled on every request, which would cost each CGI
# request more than the interpreter's own start.
import sys
%(config)ssys.path.insert(0, %(folder)r)
import nph_webjob
sys.exit(nph_webjob.main())
"""


def compile_modules(folder):
    """Byte-compile webjob.py and nph_webjob.py with this interpreter, so
    the CGI user never needs to write beside them."""
    import py_compile  # late import: install-cgi only
    for name in ('webjob.py', 'nph_webjob.py'):
        try:
            py_compile.compile(os.path.join(folder, name), doraise=True)
        except (py_compile.PyCompileError, OSError) as exc:
            raise webjob.WebJobError('%s: cannot compile: %s'
                                     % (name, webjob.one_line(exc)))


def install_cgi(path, config=None):
    """Write the CGI stub at path (temporary name, fsync, rename) for this
    interpreter and compile the modules it imports; 0 when done."""
    compile_modules(_HERE)
    if config is not None:
        config = 'import os\nos.environ.setdefault(%r, %r)\n' % (
            CONFIG_VARIABLE, os.path.abspath(config))
    text = CGI_STUB % {'python': sys.executable, 'folder': _HERE,
                       'name': os.path.basename(path), 'config': config or ''}
    temporary = '%s.%d.tmp' % (path, os.getpid())
    try:
        with open(temporary, 'w') as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o755)
        os.rename(temporary, path)
    except OSError as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise webjob.WebJobError('%s: %s' % (path, exc.strerror or exc))
    return 0


###############################################################################
# htpasswd verification (standalone server) ###################################
###############################################################################

# Verify-only: no hash is ever made here, so salts need no randomness.
CRYPT_ALPHABET = ('./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ'
                  'abcdefghijklmnopqrstuvwxyz')
HTPASSWD_MAX_PASSWORD = 1024    # SHA-crypt costs O(len**2): cap client input
SHACRYPT_ROUNDS_DEFAULT = 5000  # the spec's default and minimum
SHACRYPT_ROUNDS_MIN = 1000
SHACRYPT_ROUNDS_MAX = 1000000   # ours, not the spec's: about 1 s per check
# Byte order of the final encoding, in 3-byte groups (spec: SHA-crypt).
_SHA256_ORDER = ((0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23),
                 (24, 4, 14), (15, 25, 5), (6, 16, 26), (27, 7, 17),
                 (18, 28, 8), (9, 19, 29), (None, 31, 30))
_SHA512_ORDER = ((0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45),
                 (25, 46, 4), (47, 5, 26), (6, 27, 48), (28, 49, 7),
                 (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32),
                 (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57),
                 (37, 58, 16), (59, 17, 38), (18, 39, 60), (40, 61, 19),
                 (62, 20, 41), (None, None, 63))
_MD5_ORDER = ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5),
              (None, None, 11))


class UnsupportedHashError(Exception):
    """A stored hash is in a format this module cannot check; refuse it."""


def read_htpasswd(path):
    """Return {user: hash} from an Apache htpasswd file.

    Like mod_authn_file: skip blanks and # comments, the hash ends at the
    next ':', the first entry for a user wins; lines without ':' are skipped.
    """
    users = {}
    try:
        with open(path, encoding='utf-8', errors='surrogateescape') as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith('#') or ':' not in line:
                    continue
                user, stored = line.split(':', 2)[:2]
                users.setdefault(user, stored)
    except OSError as exc:
        raise webjob.WebJobError('htpasswd: %s: %s'
                          % (path, exc.strerror or exc)) from exc
    return users


def _encode_crypt64(digest, order):
    """Encode digest bytes, 3 at a time in order, low 6 bits first."""
    chars = []
    for group in order:
        value = 0
        for index in group:
            value = (value << 8) | (0 if index is None else digest[index])
        for _ in range(4 - group.count(None)):
            chars.append(CRYPT_ALPHABET[value & 0x3f])
            value >>= 6
    return ''.join(chars)


def _repeat_to(block, length):
    """Return block repeated and cut to exactly length bytes."""
    return (block * (length // len(block) + 1))[:length]


def md5_crypt(password, salt, magic):
    """Return the MD5-crypt digest text ($1$ glibc, $apr1$ Apache)."""
    import hashlib  # late import: start-up time
    salt = salt[:8]
    alt = hashlib.md5(password + salt + password).digest()
    ctx = hashlib.md5(password + magic + salt)
    ctx.update(_repeat_to(alt, len(password)))
    n = len(password)
    while n:
        ctx.update(b'\0' if n & 1 else password[:1])
        n >>= 1
    final = ctx.digest()
    for i in range(1000):  # the spec's fixed stretch loop
        ctx = hashlib.md5(password if i & 1 else final)
        if i % 3:
            ctx.update(salt)
        if i % 7:
            ctx.update(password)
        ctx.update(final if i & 1 else password)
        final = ctx.digest()
    return _encode_crypt64(final, _MD5_ORDER)


def sha_crypt(password, salt, rounds, algorithm):
    """Return the SHA-crypt ($5$ sha256 / $6$ sha512) digest text."""
    import hashlib  # late import: start-up time
    new = getattr(hashlib, algorithm)
    salt = salt[:16]
    size = len(password)
    alt = new(password + salt + password).digest()
    ctx = new(password + salt + _repeat_to(alt, size))
    n = size
    while n:
        ctx.update(alt if n & 1 else password)
        n >>= 1
    digest = ctx.digest()
    p_bytes = _repeat_to(new(password * size).digest(), size)
    s_bytes = _repeat_to(new(salt * (16 + digest[0])).digest(), len(salt))
    for i in range(rounds):
        ctx = new(p_bytes if i & 1 else digest)
        if i % 3:
            ctx.update(s_bytes)
        if i % 7:
            ctx.update(p_bytes)
        ctx.update(digest if i & 1 else p_bytes)
        digest = ctx.digest()
    order = _SHA256_ORDER if algorithm == 'sha256' else _SHA512_ORDER
    return _encode_crypt64(digest, order)


def _parse_rounds(text, name):
    """Return the rounds= value, clamped up to the spec's minimum."""
    digits = text[len('rounds='):]
    if not digits or not set(digits) <= set('0123456789'):
        raise UnsupportedHashError(name + ' (malformed rounds)')
    rounds = max(int(digits), SHACRYPT_ROUNDS_MIN)
    if rounds > SHACRYPT_ROUNDS_MAX:  # a stored hash must not stall the server
        raise UnsupportedHashError('%s (rounds above %d)'
                                   % (name, SHACRYPT_ROUNDS_MAX))
    return rounds


def _equal_text(computed, stored):
    """Compare in constant time; stored may hold any (escaped) text."""
    import hmac  # late import: start-up time
    return hmac.compare_digest(computed.encode('ascii'),
                               stored.encode('utf-8', 'surrogateescape'))


def _check_crypt_style(stored, password, prefix, name):
    """Split '$id$[rounds=N$]salt$digest' and compare a recomputed digest."""
    fields = stored[len(prefix):].split('$')
    rounds = SHACRYPT_ROUNDS_DEFAULT
    if (len(fields) == 3 and fields[0].startswith('rounds=')
            and name != 'md5-crypt'):
        rounds = _parse_rounds(fields.pop(0), name)
    if len(fields) != 2:
        raise UnsupportedHashError(name + ' (malformed)')
    salt = fields[0].encode('utf-8', 'surrogateescape')
    if name == 'md5-crypt':
        computed = md5_crypt(password, salt, prefix.encode('ascii'))
    else:
        computed = sha_crypt(password, salt, rounds,
                             'sha256' if prefix == '$5$' else 'sha512')
    return _equal_text(computed, fields[1])


def _check_sha1(stored, password):
    """Check htpasswd -s: '{SHA}' + base64(SHA-1(password)), unsalted."""
    import base64  # late import: start-up time
    import hashlib  # late import: start-up time
    computed = base64.b64encode(hashlib.sha1(password).digest())
    return _equal_text(computed.decode('ascii'), stored[len('{SHA}'):])


_CRYPT_PREFIXES = (('$apr1$', 'md5-crypt'), ('$1$', 'md5-crypt'),
                   ('$5$', 'sha256-crypt'), ('$6$', 'sha512-crypt'))
_UNSUPPORTED_PREFIXES = (('$2y$', 'bcrypt'), ('$2a$', 'bcrypt'),
                         ('$2b$', 'bcrypt'), ('$2x$', 'bcrypt'),
                         ('_', 'bsdi-crypt'))


def name_htpasswd_hash(stored):
    """Return a short name for the format of a stored hash (for logs)."""
    if stored.startswith('{SHA}'):
        return 'sha1'
    for prefix, name in _CRYPT_PREFIXES + _UNSUPPORTED_PREFIXES:
        if stored.startswith(prefix):
            return name
    if len(stored) == 13 and set(stored) <= set(CRYPT_ALPHABET):
        return 'des-crypt'
    return 'plaintext or unknown'


def check_htpasswd_password(stored_hash, password):
    """Return True only if password matches stored_hash.

    Raise UnsupportedHashError(format name) for a format that cannot be
    checked here (bcrypt, DES crypt, plaintext...), so it is never accepted.
    """
    if not isinstance(password, bytes):
        password = password.encode('utf-8', 'surrogateescape')
    if stored_hash.startswith('{SHA}'):
        return _check_sha1(stored_hash, password)
    for prefix, name in _CRYPT_PREFIXES:
        if stored_hash.startswith(prefix):
            if len(password) > HTPASSWD_MAX_PASSWORD:
                return False
            return _check_crypt_style(stored_hash, password, prefix, name)
    raise UnsupportedHashError(name_htpasswd_hash(stored_hash))


###############################################################################
# Standalone front end ########################################################
###############################################################################

class _Body(object):
    """The request body: at most Content-Length bytes of the connection."""

    def __init__(self, rfile, length):
        self.rfile = rfile
        self.remaining = length

    def read(self, size):
        data = self.rfile.read(min(size, self.remaining))
        self.remaining -= len(data)
        return data


class _SocketOut(object):
    """Response writer for a plain socket: sendall, and sendfile for bodies."""

    def __init__(self, sock):
        self.write = sock.sendall
        self.sendfile = sock.sendfile


def _handler_class():
    """Build the request handler (late: http.server costs start-up time)."""
    import http.server  # late import: only the standalone server needs it

    class Handler(http.server.BaseHTTPRequestHandler):
        """HTTP/1.1 keep-alive; every method goes through process_request."""

        protocol_version = 'HTTP/1.1'
        disable_nagle_algorithm = True   # INFO: else ~40 ms per response
        timeout = IDLE_TIMEOUT
        server_version = 'nph_webjob.py/%s' % __version__

        def __getattr__(self, name):
            if name.startswith('do_'):   # any method; 405 comes from the app
                return self.serve_webjob
            raise AttributeError(name)

        def authenticate(self, environ):
            """Set REMOTE_USER for an authenticated peer; return None, or
            why the request must be refused with 401.

            A client certificate (--client-ca) names the user by its subject
            CN; with --htpasswd too, the Basic user must be that same name.
            """
            auth = self.server.auth
            cert_user = None
            if auth.client_ca:
                cert_user = certificate_common_name(self.connection)
                if not cert_user:
                    return 'client certificate has no subject CN'
                environ['REMOTE_USER'] = cert_user
            if auth.passwords is None:
                return None
            user, password = parse_basic_auth(self.headers.get('Authorization'))
            if user is None:
                return 'Basic credentials missing or malformed'
            stored = auth.passwords.get(user)
            try:
                ok = stored is not None and check_htpasswd_password(stored,
                                                                    password)
            except UnsupportedHashError as exc:
                return 'user (%s): htpasswd entry in a format that cannot be '\
                    'checked (%s): refused' % (webjob.one_line(user)[:64], exc)
            if not ok:
                return 'user (%s): wrong or unknown credentials' % (
                    webjob.one_line(user)[:64])
            if cert_user is not None and cert_user != user:
                return 'Basic user (%s) differs from certificate CN (%s)' % (
                    webjob.one_line(user)[:64], webjob.one_line(cert_user)[:64])
            environ['REMOTE_USER'] = user
            return None

        def build_environ(self):
            """The CGI variables process_request reads; (environ, length)
            with length None when the body's end is unknown."""
            path, _, query = self.path.partition('?')
            environ = {'REQUEST_METHOD': self.command, 'QUERY_STRING': query,
                       'SCRIPT_NAME': path,
                       'REMOTE_ADDR': self.client_address[0],
                       'SERVER_SOFTWARE': self.version_string(),
                       'SERVER_PROTOCOL': self.request_version}
            lengths = self.headers.get_all('Content-Length') or []
            job_id = self.headers.get('Job-Id')
            if job_id is not None:
                environ['HTTP_JOB_ID'] = job_id
            length = 0
            if self.headers.get('Transfer-Encoding') or len(lengths) > 1:
                length = None           # unsupported framing: 454, then close
            elif lengths:
                environ['CONTENT_LENGTH'] = lengths[0].strip()
                length = int(lengths[0]) if _is_ascii_digits(
                    lengths[0].strip()) else None
            return environ, length

        def serve_webjob(self):
            environ, length = self.build_environ()
            refused = self.authenticate(environ)
            body = _Body(self.rfile, length or 0)
            if refused is None:
                exchange = process_request(environ, body, self.server.site)
            else:
                exchange = refuse_unauthorized(environ, self.server.site,
                                               refused)
            if length is None or body.remaining:
                self.close_connection = True     # the body's end is unknown
            extra = [('Date', self.date_time_string())]
            if self.close_connection:
                extra.append(('Connection', 'close'))
            elif self.request_version == 'HTTP/1.0':
                extra.append(('Connection', 'keep-alive'))  # 1.0 asked for it
            out = _SocketOut(self.connection) if not hasattr(
                self.connection, 'getpeercert') else self.wfile
            send_response(exchange, out, True, extra)
            log_exchange(exchange, self.server.site)
            run_triggers(exchange)

        def log_message(self, format, *args):
            write_stderr('%s: %s' % (self.address_string(), format % args))

        def log_request(self, code='-', size='-'):
            pass                    # INFO: nph-webjob.log is the access log

    return Handler


class Authentication(object):
    """The standalone server's schemes: client certificates and htpasswd."""

    def __init__(self, client_ca=None, htpasswd=None):
        self.client_ca = client_ca
        self.passwords = read_htpasswd(htpasswd) if htpasswd else None

    @property
    def enabled(self):
        return bool(self.client_ca) or self.passwords is not None


def refuse_unauthorized(environ, site, message):
    """A 401 with a Basic challenge, logged like every other answer."""
    exchange = Exchange(environ)
    exchange.site = site
    exchange.status = 401
    exchange.message = message
    exchange.headers.append(('WWW-Authenticate', 'Basic realm="WebJob"'))
    return exchange


def parse_basic_auth(header):
    """(user, password) from 'Basic <base64(user:password)>', or (None, None)."""
    import base64  # late import: standalone only
    import binascii  # late import: standalone only
    scheme, _, value = (header or '').strip().partition(' ')
    if scheme.lower() != 'basic' or len(value) > 4096:
        return None, None
    try:
        pair = base64.b64decode(value.strip(), validate=True).decode('utf-8')
    except (binascii.Error, ValueError):
        return None, None
    user, colon, password = pair.partition(':')
    return (user, password) if colon and user else (None, None)


def certificate_common_name(connection):
    """The subject CN of a verified client certificate, or None."""
    getpeercert = getattr(connection, 'getpeercert', None)
    if getpeercert is None:
        return None
    names = [value for rdn in (getpeercert() or {}).get('subject', ())
             for key, value in rdn if key == 'commonName']
    return names[0] if len(names) == 1 else None


def build_tls_context(cert, key, client_ca=None):
    """A TLS 1.2+ server context; client certificates required with a CA."""
    import ssl  # late import: standalone with TLS only
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if hasattr(context, 'minimum_version') and hasattr(ssl, 'TLSVersion'):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    else:  # COMPAT(3.6)
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    try:
        context.load_cert_chain(cert, key)
        if client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise webjob.WebJobError('TLS: cannot load %s: %s' % (
            ', '.join(p for p in (cert, key, client_ca) if p),
            webjob.describe_ssl_error(exc)))
    return context


def make_layout(root):
    """Create root/{incoming,logfiles,profiles}, and when profiles/ is new a
    sample profiles/client_1/commands/hostname.sh (0755).  Nothing that
    exists is touched.  Returns the paths created."""
    created = []
    for path in [root] + [os.path.join(root, name) for name in LAYOUT]:
        if not os.path.isdir(path):
            os.makedirs(path, 0o755)
            created.append(path)
    profiles = os.path.join(root, 'profiles')
    if profiles in created:
        commands = os.path.join(profiles, SAMPLE_CLIENT, 'commands')
        os.makedirs(commands, 0o755)
        name, text = SAMPLE_PROGRAM
        sample = os.path.join(commands, name)
        fd = os.open(sample, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
        try:
            os.write(fd, text)
        finally:
            os.close(fd)
        created.append(sample)
    return created


def is_loopback(address):
    """True when every address the name resolves to is a loopback one."""
    import ipaddress  # late import: standalone only
    import socket  # late import: standalone only
    try:
        infos = socket.getaddrinfo(address, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(
        ipaddress.ip_address(info[4][0].split('%')[0]).is_loopback
        for info in infos)


def serve(root=None, bind=DEFAULT_BIND, port=DEFAULT_PORT, config=None,
          tls_cert=None, tls_key=None, client_ca=None, htpasswd=None,
          force=False):
    """Run the standalone server until SIGTERM or SIGINT; return 0.

    BaseDirectory is --root, else the config's, else ./webjob-server; the
    layout is created if missing.  RequireUser defaults to N without
    authentication and to Y with it.  A non-loopback address needs TLS and
    authentication, unless forced: evidence and credentials would otherwise
    cross the network in the clear or be open to anyone.

    :raises webjob.WebJobError: for a refused bind, a bad config or a port
        that cannot be opened.
    """
    import itertools  # late import: standalone only
    import signal  # late import: standalone only
    import socket  # late import: standalone only
    import socketserver  # late import: standalone only
    if bool(tls_cert) != bool(tls_key) or (client_ca and not tls_cert):
        raise webjob.UsageError('--tls-cert and --tls-key go together, and '
                                '--client-ca needs them')
    auth = Authentication(client_ca, htpasswd)
    if not is_loopback(bind) and not force and not (tls_cert and auth.enabled):
        raise webjob.WebJobError('refusing to listen on %s without TLS and '
                                 'authentication (--tls-cert/--tls-key and '
                                 '--htpasswd or --client-ca); --force '
                                 'overrides' % bind)
    tls = build_tls_context(tls_cert, tls_key, client_ca) if tls_cert else None
    defaults = {'RequireUser': auth.enabled,
                'BaseDirectory': os.path.abspath(DEFAULT_ROOT)}
    overrides = {'BaseDirectory': os.path.abspath(root)} if root else {}
    counter = itertools.count(1)
    try:
        site = load_site(config, True, defaults, overrides,
                         next_serial=lambda: next(counter))
    except HTTPStatusError as exc:
        raise webjob.WebJobError(exc.message)
    os.umask(0o022)
    try:
        make_layout(site.base)
    except OSError as exc:
        raise webjob.WebJobError('%s: %s' % (exc.filename, exc.strerror))

    class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
        allow_reuse_address = True
        daemon_threads = True
        address_family = socket.AF_INET6 if ':' in bind else socket.AF_INET

        def finish_request(self, request, client_address):
            """Shake hands in the connection's own thread, time-limited, so a
            silent or hostile client never holds up the accept loop."""
            if tls is not None:
                request.settimeout(IDLE_TIMEOUT)
                request = tls.wrap_socket(request, server_side=True)
            socketserver.TCPServer.finish_request(self, request, client_address)

        def handle_error(self, request, client_address):
            """A dropped connection is one line on stderr, not a traceback."""
            exc = sys.exc_info()[1]
            write_stderr('%s: connection error: %s: %s' % (
                client_address[0], type(exc).__name__, exc))

    try:
        server = Server((bind, port), _handler_class())
    except OSError as exc:
        raise webjob.WebJobError('cannot listen on %s port %d: %s'
                                 % (bind, port, exc.strerror or exc))
    server.site = site
    server.auth = auth

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)   # INFO: even when started ignoring it
    host, port = server.server_address[:2]
    write_stderr('listening on %s://%s:%d/ (BaseDirectory %s)' % (
        'https' if tls else 'http', '[%s]' % host if ':' in host else host,
        port, site.base))
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    write_stderr('stopped')
    return 0


###############################################################################
# Locker tools: verify and list ###############################################
###############################################################################

def read_groups(incoming):
    """{group: set of extensions} for the group files in incoming/; the
    temporary dot-files of an upload in progress are not groups."""
    groups = {}
    for name in os.listdir(incoming):
        stem, dot, ext = name.rpartition('.')
        if dot and stem and not name.startswith('.') and \
                ext in GROUP_EXTENSIONS + ('lck',):
            groups.setdefault(stem, set()).add(ext)
    return groups


def read_manifest(path):
    """{file name: SHA-256 hex} from the manifest; a missing one is empty.
    Malformed lines are returned apart, as (number, text)."""
    recorded, malformed = {}, []
    try:
        handle = open(path, 'rb')
    except OSError as exc:
        if not os.path.exists(path):
            return recorded, malformed
        raise webjob.WebJobError('%s: %s' % (path, exc.strerror or exc))
    with handle:
        for number, line in enumerate(handle, 1):
            digest, sep, name = line.rstrip(b'\n').decode(
                'utf-8', 'surrogateescape').partition('  ')
            if sep and len(digest) == 64 and set(digest) <= HEX_DIGITS and \
                    name and '/' not in name:
                recorded[name] = digest.lower()
            else:
                malformed.append((number, webjob.one_line(line[:80])))
    return recorded, malformed


def verify_group(incoming, group, exts, recorded):
    """The problems of one group: incomplete, flagged at upload, streams that
    do not match the .env's hashes, files changed since upload."""
    problems = []
    if 'rdy' not in exts:
        problems.append((group, 'incomplete: no .rdy'))
    path = os.path.join(incoming, group + '.')
    if 'bad' in exts:
        result = read_key_values(path + 'bad').get('Result', 'mismatch')
        problems.append((group + '.bad', 'flagged at upload: %s' % result))
    declared = read_declared_hashes(path + 'env') if 'env' in exts else \
        (None, None, None)
    for ext in sorted(exts - {'lck'}):
        name = group + '.' + ext
        want = {'out': declared[1], 'err': declared[2]}.get(ext)
        names = ['SHA256'] + ([declared[0]] if want and declared[0] !=
                              'SHA256' else [])
        try:
            sums = hash_file(path + ext, names)
        except OSError as exc:
            problems.append((name, 'unreadable: %s' % exc.strerror))
            continue
        if want and sums[declared[0]] != want:
            problems.append((name, 'does not match %s (%s) in .env' % (
                'StdOutHash' if ext == 'out' else 'StdErrHash', declared[0])))
        if name not in recorded:
            problems.append((name, 'not in the manifest'))
        elif recorded[name] != sums['SHA256']:
            problems.append((name, 'changed since upload (SHA-256 differs '
                             'from the manifest)'))
    return problems


def verify_locker(base, out):
    """Check every group in base/incoming; print one line per problem and a
    summary.  Returns the number of problems."""
    incoming = os.path.join(base, 'incoming')
    try:
        groups = read_groups(incoming)
    except OSError as exc:
        raise webjob.WebJobError('%s: %s' % (incoming, exc.strerror or exc))
    manifest = os.path.join(base, 'logfiles', MANIFEST_NAME)
    recorded, malformed = read_manifest(manifest)
    problems = [('%s:%d' % (MANIFEST_NAME, n), 'malformed line [%s]' % text)
                for n, text in malformed]
    seen = set()
    for group in sorted(groups):
        exts = groups[group]
        seen.update(group + '.' + ext for ext in exts)
        if 'lck' not in exts:       # INFO: an upload in progress is skipped
            problems.extend(verify_group(incoming, group, exts, recorded))
    for name in sorted(set(recorded) - seen):
        problems.append((name, 'missing since upload (in the manifest)'))
    for name, problem in problems:
        out.write('%s: %s\n' % (webjob.one_line(name), problem))
    out.write('verify: %d groups, %d files in the manifest, %d problems\n' % (
        len(groups), len(recorded), len(problems)))
    return len(problems)


GROUP_NAME = (r'(?P<client>.+?)_(?P<stamp>\d{14})_(?P<serial>\d{5})_'
              r'(?P<program>.+)\Z')


def list_jobs(base, out, client=None, since=None):
    """One line per group, oldest first: Date Time ClientId Program JobId
    KidStatus OutSize ErrSize EnvSize ('-' when unknown)."""
    import re  # late import: tools only
    incoming = os.path.join(base, 'incoming')
    try:
        groups = read_groups(incoming)
    except OSError as exc:
        raise webjob.WebJobError('%s: %s' % (incoming, exc.strerror or exc))
    rows = []
    for group, exts in groups.items():
        match = re.match(GROUP_NAME, group)
        if not match or (client and match.group('client') != client) or \
                (since and match.group('stamp') < since):
            continue
        rows.append((match.group('stamp'), match.group('serial'), group,
                     match, exts))
    for stamp, serial, group, match, exts in sorted(rows):
        path = os.path.join(incoming, group + '.')
        env = read_key_values(path + 'env') if 'env' in exts else {}
        rdy = read_key_values(path + 'rdy') if 'rdy' in exts else {}
        status = env.get('KidStatus', '')
        sizes = [os.path.getsize(path + ext) if ext in exts else None
                 for ext in STREAM_EXTENSIONS]
        fields = [match.group('client'), match.group('program'),
                  rdy.get('Jid') or env.get('Jid'),
                  '' if status == 'NA' else status] + sizes
        out.write('%s-%s-%s %s:%s:%s %s\n' % (
            stamp[:4], stamp[4:6], stamp[6:8], stamp[8:10], stamp[10:12],
            stamp[12:], ' '.join(log_field(f) for f in fields)))
    return len(rows)


def parse_since(text):
    """'YYYY-MM-DD[ HH:MM[:SS]]' (or 'T' between) as the 14 digits of a
    group name's stamp.

    :raises webjob.UsageError: for anything else.
    """
    import time  # late import: tools only
    digits = ''.join(c for c in text if c not in '-: T')
    if len(digits) in (8, 12, 14) and _is_ascii_digits(digits):
        stamp = (digits + '000000')[:14]
        try:
            time.strptime(stamp, '%Y%m%d%H%M%S')     # a real date and time
            return stamp
        except ValueError:
            pass
    raise webjob.UsageError('--since: expected YYYY-MM-DD[ HH:MM[:SS]], got '
                            '[%s]' % webjob.one_line(text[:40]))


def resolve_base(options):
    """--root, else the BaseDirectory of --config (or the CGI's config
    variable), else ./webjob-server as for serve."""
    if options.root:
        return os.path.abspath(options.root)
    path = options.config or os.environ.get(CONFIG_VARIABLE)
    try:
        site = load_site(path, bool(path), {
            'BaseDirectory': os.path.abspath(DEFAULT_ROOT)})
    except HTTPStatusError as exc:
        raise webjob.WebJobError(exc.message)
    return site.base


###############################################################################
# Command line ################################################################
###############################################################################

def parse_serve_args(argv):
    """The serve options (argparse: standalone only, never on the CGI path)."""
    import argparse  # late import: start-up time

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise webjob.UsageError(message)

    parser = Parser(prog='nph_webjob.py serve', add_help=False)
    parser.add_argument('--root')
    parser.add_argument('--bind', default=DEFAULT_BIND)
    parser.add_argument('--port', type=int, default=DEFAULT_PORT)
    parser.add_argument('--config')
    parser.add_argument('--tls-cert')
    parser.add_argument('--tls-key')
    parser.add_argument('--client-ca')
    parser.add_argument('--htpasswd')
    parser.add_argument('--force', action='store_true')
    options = parser.parse_args(argv)
    if not 0 <= options.port < 65536:
        raise webjob.UsageError('--port: expected 0-65535')
    return options


def parse_locker_args(command, argv):
    """The verify and list options."""
    import argparse  # late import: start-up time

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise webjob.UsageError(message)

    parser = Parser(prog='nph_webjob.py ' + command, add_help=False)
    parser.add_argument('--root')
    parser.add_argument('--config')
    if command == 'list':
        parser.add_argument('--client')
        parser.add_argument('--since')
    options = parser.parse_args(argv)
    if command == 'list':
        if options.client is not None and \
                not webjob.is_client_id(options.client):
            raise webjob.UsageError('--client: not a valid client id')
        options.since = parse_since(options.since) if options.since else None
    return options


def run_locker_tool(command, argv):
    """verify: 0 when every group is whole, 1 when anything is wrong.
    list: 0."""
    options = parse_locker_args(command, argv)
    base = resolve_base(options)
    if command == 'verify':
        return 1 if verify_locker(base, sys.stdout) else 0
    list_jobs(base, sys.stdout, options.client, options.since)
    return 0


def main(argv=None):
    """CGI when GATEWAY_INTERFACE is set, else the command line; exit code.

    Under CGI the arguments are ignored: a web server turns a query without
    '=' into arguments, and a hostile one must still get an HTTP answer.
    """
    if os.environ.get('GATEWAY_INTERFACE') and argv is None:
        return run_cgi()
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] in (['-h'], ['--help']):
            sys.stdout.write(USAGE)
            return 0
        if argv[:1] in (['verify'], ['list']):
            return run_locker_tool(argv[0], argv[1:])
        if argv == [SUPERVISE_COMMAND]:
            return run_trigger_supervisor(sys.stdin.buffer)
        if argv[:1] == ['install-cgi']:
            if len(argv) == 2 or (len(argv) == 4 and argv[2] == '--config'):
                return install_cgi(argv[1], (argv[3:] or [None])[0])
            raise webjob.UsageError('install-cgi: expected PATH '
                                    '[--config FILE]')
        if argv[:1] != ['serve']:
            raise webjob.UsageError('expected "serve", "verify", "list", '
                                    '"install-cgi" or -h'
                                    if argv else
                                    'not a CGI request (GATEWAY_INTERFACE '
                                    'is unset) and no command given')
        options = parse_serve_args(argv[1:])
        return serve(options.root, options.bind, options.port, options.config,
                     options.tls_cert, options.tls_key, options.client_ca,
                     options.htpasswd, options.force)
    except webjob.UsageError as exc:
        write_stderr(exc)
        sys.stderr.write(USAGE)
        return 2
    except webjob.WebJobError as exc:
        write_stderr(exc)
        return 1
    except BrokenPipeError:     # 'list | head': the reader went away
        write_stderr('stdout: the reader went away (broken pipe)')
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == '__main__':
    sys.exit(main())
