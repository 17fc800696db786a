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
           'make_layout', 'StandaloneHandler', 'StandaloneServer', 'serve',
           'dsvtool_main', 'main']

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
    204: 'No Content',
    251: 'Link Test OK',
    252: 'No Job Queued',
    253: 'Upload Already Stored',
    401: 'Unauthorized',
    404: 'Not Found',
    405: 'Method Not Allowed',
    409: 'Conflict',
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

#: Statuses the standalone front end sends for a request it refuses before
#: the handler sees it (RFC 9110 reasons): they never reach a CGI.
HTTP_REASONS = {
    400: 'Bad Request',
    408: 'Request Timeout',
    414: 'URI Too Long',
    431: 'Request Header Fields Too Large',
    505: 'HTTP Version Not Supported',
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
    ('JobHandOutTimeLimit', 'uint', 3600),
    ('JobQueueEnable', 'yn', False),
    ('MaxContentLength', 'uint', 100000000),
    ('OverrideDirectory', 'text', ''),
    ('PartialExpireTime', 'uint', 604800),
    ('PartialUploadEnable', 'yn', False),
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
UPLOAD_ID_VARIABLE = 'HTTP_WEBJOB_UPLOAD_ID'    # the WebJob-Upload-Id header
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
DRAIN_LIMIT = 64 << 20          # bytes of a refused body read and dropped
SMALL_BODY = 1 << 16            # GET bodies up to this go out with the head
_O_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)   # never write through a link
_O_NONBLOCK = getattr(os, 'O_NONBLOCK', 0)   # never hang opening a FIFO
SERIAL_MODULUS = 100000         # the 5-digit NNNNN of job ids and groups
NAME_MAX = 255                  # longest file name in incoming/
MAX_QUERY = 4096                # longest QUERY_STRING looked at
MAX_SIGNATURE = 255             # WebJob-Payload-Signature (client limit)
MAX_MESSAGE = 1024              # longest ErrorMessage in a log line
MAX_STDERR_LINE = 512           # bytes of a command's stderr looked at
STDERR_WAIT = 5                 # seconds a trigger's stderr may stay open
IDLE_TIMEOUT = 120              # standalone: seconds a socket may stay silent
LISTEN_BACKLOG = 4096           # standalone: connections queued to accept
STOP_GRACE = 20                 # standalone: seconds in-flight requests get
STOP_LINGER = 5                 # ... and their handlers after being cut
SERIAL_BLOCK = 1000             # serial numbers reserved per fsynced write
SERIAL_FILE = 'nph-webjob-serial.%s'    # logfiles/, one per ServerId

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
Usage: nph_webjob.py serve [--root DIR] [--init] [--bind ADDR] [--port N]
                           [--config FILE] [--tls-cert FILE --tls-key FILE
                           [--client-ca FILE]] [--htpasswd FILE] [--force]
                           [--admin USER[,USER...]] [--server-id ID]
       nph_webjob.py verify [--root DIR | --config FILE] [--json]
       nph_webjob.py list [--root DIR | --config FILE] [--client ID]
                          [--since YYYY-MM-DD[ HH:MM[:SS]]] [--json]
       nph_webjob.py job add --client ID[,ID...] --command NAME
                             [--alias NAME] [--args TEXT] [--comment TEXT]
                             [--priority N] [--expires WHEN]
                             [--pin | --sha256 HEX | --sha1 HEX | --md5 HEX]
       nph_webjob.py job list [--client ID] [--json]
       nph_webjob.py job cancel CLIENT/NNNNNN...
       nph_webjob.py hunt start NAME --command NAME [job add options]
                                {--clients ID,... | --pattern GLOB |
                                 --group FILE} [--rate N]
       nph_webjob.py hunt {status|cancel} NAME [--json]
       nph_webjob.py hunt list [--json]
       nph_webjob.py report [--client ID] [--since WHEN] [--json]
                            [--html FILE]
                      (job, hunt, report: [--root DIR | --config FILE])
       nph_webjob.py install-cgi PATH [--config FILE] [--force]
       nph_webjob.py dsvtool ARGS...      (webjob-dsvtool: sign, check, keys)
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


class Terminated(HTTPStatusError):
    """The web server ended the CGI (SIGTERM: the client went away, or a
    timeout); raised where the CGI was, so the upload is cleaned up and the
    request still gets its log line.  While the body is read it ends the
    body (copy_stream), as a cut connection does."""


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


def first_line(data):
    """The first non-blank line of a command's stderr, as one log line."""
    for line in data.splitlines():
        text = webjob.one_line(line.decode('utf-8', 'replace'))
        if text:
            return text
    return ''


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
        self.real_base = os.path.realpath(self.base)   # links resolved
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
    try:
        found, where = webjob.read_override_file(path, SERVER_CONTROLS)
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


def is_client_id(value):
    """CLIENTID: the client's rule (webjob.is_client_id), less what would
    make a name in incoming/ lie: a leading '-' (an option to any tool
    handed the name) or '_<14 digits>_<5 digits>' followed by '_' or the
    end, which 'list' would read as another group's date and serial."""
    if not webjob.is_client_id(value) or value[0] == '-':
        return False
    parts = (value + '_').split('_')
    return not any(len(parts[i]) == 14 and len(parts[i + 1]) == 5 and
                   webjob.is_digits(parts[i]) and
                   webjob.is_digits(parts[i + 1])
                   for i in range(1, len(parts) - 2))


#: Every query parameter and its anchored check (whole value, no escapes).
QUERY_CHECKS = {
    'VERSION': is_version,
    'SYSTEM': is_system,
    'CLIENTID': is_client_id,
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
            value = decode_query_value(raw) if '%' in raw or '+' in raw \
                else raw        # INFO: every check takes ASCII only anyway
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
    The same object follows a partial upload's stream across its appends
    (begin and end around each, sums at the end).
    """

    def __init__(self, length=0, aside=()):
        import hashlib  # late import: PUT with IntegrityEnable only
        self.sha256 = hashlib.sha256()
        self.others = [(name, hashlib.new(name.lower())) for name in aside]
        self.queue = self.thread = None
        self.begin(length)

    def begin(self, count):
        """Before count bytes come: a helper thread for the aside digests
        when that is more than THREAD_HASH_MIN."""
        if self.others and count > THREAD_HASH_MIN:
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

    def end(self):
        """After the bytes begin announced: every block is in the aside
        digests too."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.queue = self.thread = None

    def sums(self):
        """{HashType: lower-case hex} of what was fed."""
        found = dict((name, digest.hexdigest()) for name, digest
                     in self.others)
        found['SHA256'] = self.sha256.hexdigest()
        return found

    def finish(self):
        """end() then sums(): the digests once every block is in."""
        self.end()
        return self.sums()


def sha256_hex(data):
    import hashlib  # late import: PUT with IntegrityEnable only
    return hashlib.sha256(data).hexdigest()


def hash_file(path, names):
    """{name: hex} of a file in one streamed pass (webjob's block hashing);
    names as in HASH_NAMES."""
    with open(path, 'rb', buffering=0) as handle:
        found = webjob.hash_stream_all(handle, [name.lower() for name in names])
    return dict((name, found[name.lower()].hex()) for name in names)


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
    copied, why it stopped short or '').

    :raises HTTPStatusError: 500 when fd cannot be written (disk full).
    """
    done = 0
    while done < length:
        try:
            chunk = stdin.read(min(BLOCK_SIZE, length - done))
        except OSError as exc:      # includes socket.timeout on 3.6-3.9
            return done, 'read error: %s' % (exc.strerror or exc)
        except Terminated as exc:   # the CGI's SIGTERM: the body ends here
            return done, exc.message
        if not chunk:
            return done, 'end of input'
        if fd is not None:
            view = memoryview(chunk)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError as exc:
                raise HTTPStatusError(500, 'Storage: cannot write (%s) '
                                      'after %d bytes' % (
                                          exc.strerror or exc, done))
        if digests is not None:
            digests.update(chunk)
        done += len(chunk)
    return done, ''


class CountingReader(object):
    """The request body as store_upload reads it, counting what it took, so
    a refused upload's rest can be drained (drain_body)."""

    def __init__(self, stream):
        self.stream = stream
        self.count = 0

    def read(self, size):
        data = self.stream.read(size)
        self.count += len(data)
        return data

    def read1(self, size):
        """What has arrived, up to size (ArrivingBody): a CGI's stdin read
        whole 1 MiB blocks, so the CGI Apache kills on a cut PATCH held
        only the blocks it had completed."""
        data = getattr(self.stream, 'read1', self.stream.read)(size)
        self.count += len(data)
        return data


def drain_body(stdin, length):
    """Read and discard up to DRAIN_LIMIT bytes of a refused body, so the
    client, still sending, gets to read the answer instead of a reset.
    Never raises: the answer is decided already."""
    if 0 < length <= DRAIN_LIMIT:
        try:
            copy_stream(stdin, None, length)
        except Exception:
            pass


def write_stream(path, stdin, length, digests=None):
    """Write the next length bytes of the body to a new file, fsynced (an
    empty one needs no fsync: the folder's makes it durable).

    :raises HTTPStatusError: 456 when the body ends early, 500 when the
        file cannot be written.
    """
    fd = open_new(path)
    try:
        done, why = copy_stream(stdin, fd, length, digests)
        if done != length:
            raise HTTPStatusError(456, 'Stream length (%d) does not equal '
                                  'number of bytes received (%d) for %s: %s'
                                  % (length, done, os.path.basename(path),
                                     why))
        if length:
            sync_file(fd, path)
    finally:
        os.close(fd)


def open_new(path, flags=os.O_TRUNC):
    """Open a file of incoming/ for writing, never through a link.

    :raises HTTPStatusError: 500 naming the file.
    """
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | _O_NOFOLLOW | flags,
                       0o644)
    except OSError as exc:
        if flags & os.O_EXCL:
            raise
        raise HTTPStatusError(500, 'Storage: cannot create %s (%s)' % (
            os.path.basename(path), exc.strerror or exc))


def sync_file(fd, path):
    """fsync, as a 500 naming the file when the disk refuses."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise HTTPStatusError(500, 'Storage: cannot fsync %s (%s)' % (
            os.path.basename(path), exc.strerror or exc))


def claim_group(incoming, prefix, suffix, first):
    """Take the first free group name from serial number first on.

    The claim is '<group>.lck' made with O_EXCL and held with flock for
    the whole upload, so verify can tell a live upload from the lock a
    killed server left (stale).  A name whose lock, any group file or any
    of their temporary names exists is skipped, so nothing is ever
    overwritten, written through a planted link, or refused because of one
    (verify reports what was planted).  Returns (group, lock path,
    lock descriptor).

    :raises HTTPStatusError: 451 when all 100000 numbers are taken.
    """
    import errno  # late import: start-up time
    import fcntl  # late import: start-up time
    for step in range(SERIAL_MODULUS):
        group = '%s%05d%s' % (prefix, (first + step) % SERIAL_MODULUS, suffix)
        lock = os.path.join(incoming, group + '.lck')
        try:
            fd = open_new(lock, os.O_EXCL)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                continue
            raise HTTPStatusError(500, 'Storage: cannot create %s (%s)' % (
                os.path.basename(lock), exc.strerror or exc))
        fcntl.flock(fd, fcntl.LOCK_EX)
        if any(os.path.lexists(os.path.join(incoming, name % (group, ext)))
               for ext in GROUP_EXTENSIONS for name in ('%s.%s', '.%s.%s')):
            os.unlink(lock)
            os.close(fd)
            continue
        return group, lock, fd
    raise HTTPStatusError(451, 'File (%s*%s) already exists for every serial '
                          'number' % (prefix, suffix))


def store_upload(site, stdin, prefix, suffix, lengths, job_id):
    """Store out, err and env as a new group, then .rdy; return (group,
    integrity note for the log message).

    Each stream is written under a dot-prefixed temporary name, fsynced and
    renamed.  The group's lock becomes its .rdy: 'Jid=<job id>\\n' is
    written into the held .lck, fsynced, and the .lck renamed to .rdy (the
    commit point, one file fewer than a separate temporary); the folder is
    fsynced after it.  With IntegrityEnable the streams are hashed as they
    are copied, checked against the .env's StdOutHash/StdErrHash (a
    mismatch adds the .bad sidecar, never drops evidence) and every file's
    SHA-256 goes to the manifest once the group is committed, so the
    manifest only names accepted groups.  On any failure before the commit
    every file of the group, its lock included, is removed.

    :raises HTTPStatusError: 456 for a short body, 451 when no name is
        free, 500 when the disk refuses.
    """
    incoming = site.incoming
    checking = site.values['IntegrityEnable']
    group, lock, lock_fd = claim_group(incoming, prefix, suffix,
                                       site.next_serial())
    made = [lock]
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
        manifest, flag = [], None
        if checking:
            declared = read_declared_hashes(temps[2][0])
            for n in (0, 1):
                if declared[0] is not None and declared[0] not in sums[n]:
                    sums[n].update(hash_file(temps[n][0], [declared[0]]))
            note, flag = check_upload_hashes(declared, sums[0], sums[1])
            manifest = [(sums[n]['SHA256'], group + '.' + ext)
                        for n, ext in enumerate(STREAM_EXTENSIONS)]
        note += commit_group(site, group, lock, lock_fd, made, temps,
                             manifest, flag, record)
        return group, note
    finally:
        os.close(lock_fd)       # INFO: releases the flock, after the commit
        if made:
            remove_files(made)


def remove_files(paths):
    """Remove what a failed upload made, with SIGTERM held off (the CGI's
    catch_termination) so the clean-up is never cut short."""
    import _signal as signal  # late import: failed uploads only (as catch_termination)
    held = (signal.SIGTERM, signal.SIGHUP)
    mask = getattr(signal, 'pthread_sigmask', None)
    if mask is not None:
        mask(signal.SIG_BLOCK, held)
    try:
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass
    finally:
        if mask is not None:
            mask(signal.SIG_UNBLOCK, held)


def seal_group(temps, made, lock, lock_fd, record):
    """Rename the streams into place, then turn the lock into the .rdy:
    its record written and fsynced before the rename that commits."""
    try:
        for temp, final in temps:
            os.rename(temp, final)
            made.append(final)
        view = memoryview(record)
        while view:
            view = view[os.write(lock_fd, view):]
    except OSError as exc:
        raise HTTPStatusError(500, 'Storage: cannot seal the group (%s)'
                              % (exc.strerror or exc))
    sync_file(lock_fd, lock)
    try:
        os.rename(lock, lock[:-len('lck')] + 'rdy')
    except OSError as exc:
        raise HTTPStatusError(500, 'Storage: cannot rename %s to .rdy (%s)'
                              % (os.path.basename(lock), exc.strerror or exc))



def commit_group(site, group, lock, lock_fd, made, temps, manifest, flag,
                 record):
    """The commit a PUT and a completed partial upload both end in: the
    .bad sidecar when the hashes disagree, the streams renamed into place
    (temps), the .lck turned .rdy, the folder fsynced, and only then the
    manifest, so it names accepted groups only.  made lists what a failure
    removes; it is emptied once the group is committed.  Returns the log
    note's addition."""
    import io  # late import: start-up time
    incoming = site.incoming
    if flag is not None:
        temp = os.path.join(incoming, '.%s.%s' % (group, FLAG_EXTENSION))
        made.append(temp)
        write_stream(temp, io.BytesIO(flag), len(flag))
        temps.append((temp, os.path.join(incoming,
                                         group + '.' + FLAG_EXTENSION)))
        if manifest:
            manifest.append((sha256_hex(flag), group + '.' + FLAG_EXTENSION))
    if manifest:
        manifest.append((sha256_hex(record), group + '.rdy'))
    seal_group(temps, made, lock, lock_fd, record)
    del made[:]                 # INFO: committed from here on; keep it all
    webjob.fsync_folder(incoming)
    if manifest and not append_log(site.manifest_path, ''.join(
            '%s  %s\n' % pair for pair in manifest)):
        return '; manifest (%s) not written' % MANIFEST_NAME
    return ''


###############################################################################
# Logging #####################################################################
###############################################################################

#: Characters a log field shows as themselves: printable ASCII less the
#: space (the separator) and the backslash (the escape).
LOG_FIELD_CHARS = frozenset(webjob.PRINTABLE_ASCII) - frozenset(' \\')
MAX_LOG_FIELD = 128             # characters of a value a log field shows


def escape_log_field(text):
    """Each character outside LOG_FIELD_CHARS as \\xHH or \\uHHHH, and a
    leading '-' as \\x2d, so '-' alone means empty and '--' only ever
    separates the message."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in LOG_FIELD_CHARS:
            out.append(ch)
        else:
            out.append('\\x%02x' % code if code < 256 else '\\u%04x' % code
                       if code < 0x10000 else '\\U%08x' % code)
    if out and out[0] == '-':
        out[0] = '\\x2d'
    return ''.join(out)


def log_field(value):
    """One log field: '-' when empty, else at most MAX_LOG_FIELD characters
    of the value, escaped (escape_log_field) unless already plain."""
    text = '' if value is None else str(value)[:MAX_LOG_FIELD]
    if not text:
        return '-'
    if LOG_FIELD_CHARS.issuperset(text) and text[0] != '-':
        return text                 # the usual case, done in C
    return escape_log_field(text)


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
    """Append one line with a single write(2) on O_APPEND; False if the log
    cannot be opened or written whole.  A log that is a symbolic link is
    not written through (it could point anywhere outside logfiles/).

    No flock: on a local file system the kernel positions and writes an
    O_APPEND write atomically, so concurrent writers (threads, CGI
    processes, several servers) never interleave a line.  A lock around it
    only queued every request behind one another (a convoy of 14.5 ms per
    line under 16 connections).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                     _O_NOFOLLOW | _O_NONBLOCK, 0o644)
    except OSError:
        return False
    try:
        data = line.encode('ascii')
        return os.write(fd, data) == len(data)
    except OSError:
        return False
    finally:
        os.close(fd)


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
    prefix = {'GET': 'GetTrigger', 'PUT': 'PutTrigger',
              'PATCH': 'PutTrigger'}.get(exchange.method)   # PATCH: stored
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
    import signal  # late import: triggers only
    import tempfile  # late import: triggers only
    order = json.dumps({
        'command': command, 'fields': list(fields), 'incoming': site.incoming,
        'log': site.trigger_log_path,
        'values': dict((name, site.values[name]) for name in TRIGGER_VALUES)})
    with tempfile.TemporaryFile() as order_file:   # no pipe to keep fed
        order_file.write(order.encode('utf-8'))
        order_file.seek(0)
        proc = webjob.spawn(
            [sys.executable, '-I', '-S', os.path.realpath(__file__),
             SUPERVISE_COMMAND], stdin=order_file, stdout=webjob.DEVNULL,
            stderr=webjob.DEVNULL, cwd=site.incoming,
            env=supervisor_environment())
    if webjob.wait_with_deadline(proc, SUPERVISOR_START_LIMIT, signal.SIGKILL,
                                 leave_group=True):
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
    """Start the trigger in its own session and process group, log its
    start, wait for it (SIGKILL to the group at TriggerTimeLimit) and log
    how it ended: webjob's spawn and wait_with_deadline, the client's own
    supervision.  What the trigger leaves running in the background when it
    exits in time is its own business and is left alone."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE,
                   signal.SIGALRM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    limit = site.values['TriggerTimeLimit']
    errors, stderr_end = os.pipe()
    try:
        proc = webjob.spawn(['/bin/sh', '-c', command], stderr=stderr_end,
                            cwd=site.incoming, env=command_environment())
    except BaseException:
        os.close(errors)
        raise
    finally:
        os.close(stderr_end)
    log_trigger(site, fields, proc.pid, 'started', 'Command (%s)' % command)
    stderr = collect_stderr(errors)
    expired = webjob.wait_with_deadline(proc, limit, signal.SIGKILL,
                                        leave_group=True)
    if expired:
        state, message = 'timeout', 'Signal (%d) to the process group when ' \
            'TriggerTimeLimit (%d s) expired' % (signal.SIGKILL, limit)
        wait_for_group_end(proc.pid, STDERR_WAIT, time)
    elif proc.returncode < 0:
        state, message = 'killed', 'Signal (%d)' % -proc.returncode
    else:
        state, message = 'finished', 'Exit status (%d)' % proc.returncode
    stderr.join(STDERR_WAIT)    # EOF at once, unless a child kept it open
    why = first_line(b''.join(stderr.kept))
    log_trigger(site, fields, proc.pid, state, message + ('; stderr: ' + why
                                                          if why else ''))


def wait_for_group_end(pgid, limit, time):
    """Until no process of the killed group is left (SIGKILL is delivered
    at once but a process takes a moment to die), at most limit seconds,
    so the trigger log's timeout line is only written once it is true."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except OSError:
            return
        time.sleep(0.01)        # INFO: bounded by limit; the kill is sent


def collect_stderr(fd):
    """A thread that reads a command's stderr pipe to its end, keeping the
    first MAX_STDERR_LINE bytes (.kept) and dropping the rest, so a chatty
    command neither blocks on a full pipe nor fills a disk."""
    import threading  # late import: triggers only

    def drain():
        size = 0
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                if size < MAX_STDERR_LINE:
                    reader.kept.append(data[:MAX_STDERR_LINE - size])
                    size += len(data)
        except OSError:
            pass
        finally:
            os.close(fd)

    import signal  # late import: triggers only
    reader = threading.Thread(target=drain)
    reader.daemon = True
    reader.kept = []
    # INFO: the thread is born with these blocked, so that a signal is
    # always handled by the main thread's wait, never by this read.
    wanted = [signal.SIGALRM, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT,
              signal.SIGPIPE, signal.SIGHUP]
    before = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        reader.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return reader


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
# Job queues ##################################################################
###############################################################################

# INFO: BaseDirectory/jobqueues/<ClientId>/<NNNNNN>.job is one queue entry
# as Key=Value lines: the 1.9 job file's keys (Command, CommandAlias,
# CommandLine, CommandMd5/Sha1/Sha256, Comment) plus its state.  Every change
# is made under flock on that folder's .lock and written whole (temporary
# name, fsync, rename, folder fsync): an entry survives a kill at any point,
# and servers sharing one BaseDirectory hand each entry out once.  Lock
# order: a client's queue, then a hunt's; never the other way round.

QUEUE_FOLDER = 'jobqueues'
HUNT_FOLDER = '.hunts'          # jobqueues/.hunts: no ClientId starts with .
QUEUE_NAME = 'default'          # the FILENAME of a JOB request
ENTRY_EXTENSION = '.job'
ENTRY_DIGITS = 6
OPEN_STATES = ('queued', 'handed-out')
FINAL_STATES = ('done', 'failed', 'expired', 'cancelled')
ENTRY_KEYS = ('Entry', 'ClientId', 'Command', 'CommandAlias', 'CommandLine',
              'CommandMd5', 'CommandSha1', 'CommandSha256', 'Comment', 'Hunt',
              'Priority', 'Created', 'Expires', 'State', 'JobIds', 'HandOuts',
              'HandedOut', 'Asked', 'Finished', 'Result', 'Why')
#: What a JOB answer tells the client, in this order (the job file's keys).
JOB_REPLY_KEYS = ('CommandAlias', 'CommandLine', 'CommandMd5', 'CommandSha1',
                  'CommandSha256', 'Comment')
PIN_KEYS = (('CommandMd5', 'MD5', 32), ('CommandSha1', 'SHA1', 40),
            ('CommandSha256', 'SHA256', 64))
MAX_HAND_OUTS = 3               # then failed: the client never answers
DEFAULT_PRIORITY = 50           # lower runs first
RATE_WINDOW = 60                # seconds: a hunt's Rate is per minute


def queue_folder(base, client_id):
    """BaseDirectory/jobqueues/<ClientId> (client_id already validated)."""
    return os.path.join(base, QUEUE_FOLDER, client_id)


class FolderLock(object):
    """flock(LOCK_EX) on <folder>/.lock, held for a with block."""

    def __init__(self, folder):
        self.path = os.path.join(folder, '.lock')
        self.fd = None

    def __enter__(self):
        import fcntl  # late import: job queues only
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | _O_NOFOLLOW,
                          0o644)      # INFO: read-only: any owner may lock
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)       # INFO: closing releases the flock
        self.fd = None


def make_queue_folder(path):
    """Create a folder under jobqueues/ owned like jobqueues/ itself: the
    administrator's tools run as root, the CGI as the web server's user."""
    os.makedirs(path, 0o755)
    owner = os.stat(os.path.dirname(path))
    if os.geteuid() == 0 and owner.st_uid != 0:
        os.chown(path, owner.st_uid, owner.st_gid)


def format_entry(entry):
    """An entry's Key=Value lines, ENTRY_KEYS first, one line each."""
    keys = list(ENTRY_KEYS) + sorted(set(entry) - set(ENTRY_KEYS))
    return ''.join('%s=%s\n' % (key, webjob.one_line(entry[key]))
                   for key in keys if key in entry).encode('utf-8')


def read_entries(folder):
    """[(entry dict)] of a queue folder, oldest first; {} when absent."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    entries = []
    for name in sorted(names):
        if name.endswith(ENTRY_EXTENSION) and not name.startswith('.'):
            entry = read_key_values(os.path.join(folder, name))
            entry['Entry'] = name[:-len(ENTRY_EXTENSION)]
            entries.append(entry)
    return entries


def save_entry(folder, entry):
    webjob.replace_file(os.path.join(folder, entry['Entry'] + ENTRY_EXTENSION),
                format_entry(entry))


def entry_name(entry):
    """<ClientId>/<NNNNNN>: how tools and logs name an entry."""
    return '%s/%s' % (entry.get('ClientId', '?'), entry['Entry'])


def as_int(value, default=0):
    return int(value) if _is_ascii_digits(value or '') else default


def settle_entry(entry, now, hand_out_limit):
    """Move an open entry on by the clock: expired past Expires, queued
    again (or failed after MAX_HAND_OUTS) when handed out longer than
    hand_out_limit with no result.  True when it changed."""
    state = entry.get('State')
    if state not in OPEN_STATES:
        return False
    expires = as_int(entry.get('Expires'))
    if expires and now >= expires:
        entry['State'], entry['Finished'] = 'expired', '%d' % now
        entry['Why'] = 'no result before the expiry' if state == \
            'handed-out' else 'not handed out before the expiry'
        return True
    if state == 'handed-out' and hand_out_limit and \
            now - as_int(entry.get('HandedOut')) >= hand_out_limit:
        if as_int(entry.get('HandOuts')) >= MAX_HAND_OUTS:
            entry['State'], entry['Finished'] = 'failed', '%d' % now
            entry['Why'] = 'handed out %s times, no result' % entry.get(
                'HandOuts')
        else:
            entry['State'] = 'queued'
            entry['Why'] = 'no result within JobHandOutTimeLimit (%d s); '\
                'queued again' % hand_out_limit
        return True
    return False


def add_entries(base, client_id, fields, now):
    """Queue a new entry for one client; return its name (client/NNNNNN)."""
    folder = queue_folder(base, client_id)
    if not os.path.isdir(os.path.dirname(folder)):
        os.makedirs(os.path.dirname(folder), 0o755)
    if not os.path.isdir(folder):
        make_queue_folder(folder)
    with FolderLock(folder):
        numbers = [as_int(entry['Entry']) for entry in read_entries(folder)]
        entry = dict(fields, ClientId=client_id, State='queued',
                     Created='%d' % now, HandOuts='0')
        entry['Entry'] = '%0*d' % (ENTRY_DIGITS, max(numbers or [0]) + 1)
        save_entry(folder, entry)
    return entry_name(entry)


def hand_out_job(site, exchange):
    """JOB: hand out this client's next queued entry, exactly once.

    Under the queue's lock: settle every entry by the clock, then take the
    first queued one (Priority, then age) whose hunt's rate allows it, give
    it a fresh Job-Id and write it as handed out before answering.
    """
    import io  # late import: start-up time
    if exchange.filename != QUEUE_NAME:
        raise HTTPStatusError(404, 'Job queue (%s) does not exist; expected '
                              '%s' % (exchange.filename, QUEUE_NAME))
    folder = queue_folder(site.base, exchange.client_id)
    exchange.job_id = None
    exchange.status, exchange.message = 252, 'No job queued'
    if not os.path.isdir(folder):
        return
    now = site.clock()
    limit = site.values['JobHandOutTimeLimit']
    with FolderLock(folder):
        entries = read_entries(folder)
        for entry in entries:
            if settle_entry(entry, now, limit):
                save_entry(folder, entry)
        waiting = sorted((as_int(e.get('Priority'), DEFAULT_PRIORITY),
                          e['Entry'], e) for e in entries
                         if e.get('State') == 'queued')
        for priority, number, entry in waiting:
            if entry.get('Hunt') and not hunt_allows(
                    site.base, entry['Hunt'], exchange.client_id, now):
                if not entry.get('Asked'):
                    entry['Asked'] = '%d' % now
                    save_entry(folder, entry)
                exchange.message = 'No job handed out: hunt (%s) at its ' \
                    'rate' % entry['Hunt']
                continue
            job_id = fresh_job_id(site, entries)
            entry['JobIds'] = ' '.join(entry.get('JobIds', '').split() +
                                       [job_id])
            entry['HandOuts'] = '%d' % (as_int(entry.get('HandOuts')) + 1)
            entry['State'], entry['HandedOut'] = 'handed-out', '%d' % now
            entry.setdefault('Asked', '%d' % now)
            save_entry(folder, entry)
            body = ''.join('%s=%s\n' % (key, entry[key]) for key in
                           JOB_REPLY_KEYS if entry.get(key)).encode('utf-8')
            exchange.job_id = job_id
            exchange.body, exchange.body_length = io.BytesIO(body), len(body)
            exchange.status = 200
            exchange.message = 'Success: handed out %s (%s)' % (
                entry_name(entry), entry.get('CommandAlias'))
            return


def fresh_job_id(site, entries):
    """A job id no entry of this queue was ever given (two servers with one
    ServerId may number alike in the same second)."""
    taken = set()
    for entry in entries:
        taken.update(entry.get('JobIds', '').split())
    for attempt in range(SERIAL_MODULUS):
        job_id = make_job_id(site)
        if job_id not in taken:
            return job_id
    raise HTTPStatusError(500, 'No free job id for this queue')


def judge_upload(env, flagged):
    """Why a stored job failed, from its .env values ([] when it did not):
    a KidStatus other than 0, a GetError or RunError, a program that never
    ran, hashes the server flagged (.bad).  A record without KidStatus is
    no WebJob .env and is not judged."""
    why = ['hash mismatch flagged by the server'] if flagged else []
    if 'KidStatus' not in env:
        return why
    status = env.get('KidStatus', 'NA')
    for key in ('GetError', 'RunError'):
        value = env.get(key, 'NA')
        if value and value != 'NA':
            why.append('%s: %s' % (key, value))
    if status == 'NA' or not status:
        if not why:
            why.append('KidStatus=NA: the program did not run')
    elif status != '0':
        why.append('KidStatus=%s' % status)
    return why


def record_result(site, client_id, job_id, group, why):
    """Tie a stored upload to the queue entry its Job-Id was handed out for:
    done, or failed with why.  Returns the log note ('' for no entry)."""
    folder = queue_folder(site.base, client_id)
    if not job_id or not os.path.isdir(folder):
        return ''
    with FolderLock(folder):
        for entry in read_entries(folder):
            if job_id not in entry.get('JobIds', '').split():
                continue
            if entry.get('State') in ('done', 'failed') and \
                    entry.get('Result'):
                return '; queue entry %s already has a result (%s): kept, ' \
                    'not counted' % (entry_name(entry), entry['Result'])
            entry['State'] = 'failed' if why else 'done'
            entry['Finished'] = '%d' % site.clock()
            entry['Result'] = group
            entry['Why'] = '; '.join(why)
            save_entry(folder, entry)
            return '; queue entry %s %s' % (entry_name(entry),
                                            entry['State'])
    return ''


def hunt_folder(base):
    return os.path.join(base, QUEUE_FOLDER, HUNT_FOLDER)


def hunt_allows(base, hunt, client_id, now):
    """True when the hunt may hand out one more job now: fewer than Rate
    distinct clients in the last minute (Rate 0: no limit); the hand-out
    is counted in <hunt>.handouts under the hunt's lock."""
    folder = hunt_folder(base)
    record = os.path.join(folder, hunt + '.hunt')
    if not (webjob.is_client_id(hunt) and os.path.isfile(record)):
        return True             # INFO: a hunt removed by hand limits nothing
    rate = as_int(read_key_values(record).get('Rate'))
    path = os.path.join(folder, hunt + '.handouts')
    with FolderLock(folder):
        if rate:
            recent = set()
            try:
                with open(path, 'rb') as handle:
                    for line in handle:
                        when, _, who = line.decode('ascii', 'replace') \
                            .strip().partition(' ')
                        if now - as_int(when) < RATE_WINDOW:
                            recent.add(who)
            except OSError:
                pass
            if client_id not in recent and len(recent) >= rate:
                return False
        append_log(path, '%d %s\n' % (now, client_id))
    return True


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
    stdin = CountingReader(stdin)
    try:
        if site is None:
            path = environ.get(CONFIG_VARIABLE)
            site = load_site(path or DEFAULT_CONFIG, required=bool(path))
        exchange.site = site
        site.check_layout()
        partial = exchange.method in PARTIAL_METHODS and \
            site.values['PartialUploadEnable']
        if exchange.method not in ('GET', 'PUT') and not partial and not (
                exchange.method == 'JOB' and site.values['JobQueueEnable']):
            raise HTTPStatusError(405, 'Method (%s) not allowed'
                                  % webjob.one_line(exchange.method[:32]))
        names = partial_names(environ) if partial else \
            PUT_PARAMETERS if exchange.method == 'PUT' else GET_PARAMETERS
        query = parse_query(environ.get('QUERY_STRING', ''), names)
        exchange.client_id = query['CLIENTID']
        exchange.filename = query['FILENAME']
        site = exchange.site = apply_overrides(site, exchange.client_id,
                                               exchange.filename)
        check_user(site, exchange)
        if partial:
            serve_partial(site, exchange, query, stdin)
        elif exchange.method == 'GET':
            serve_get(site, exchange)
        elif exchange.method == 'JOB':
            hand_out_job(site, exchange)
        else:
            serve_put(site, exchange, query, stdin)
    except HTTPStatusError as exc:
        exchange.status, exchange.message = exc.status, exc.message
    except Exception as exc:    # last resort: a 500 and a log line, no trace
        exchange.status = 500
        exchange.message = 'Internal error: %s: %s' % (type(exc).__name__, exc)
    if exchange.status >= 300 and _is_ascii_digits(exchange.content_length):
        drain_body(stdin, int(exchange.content_length) - stdin.count)
    if exchange.status >= 300 and exchange.body is not None:
        exchange.body.close()
        exchange.body, exchange.body_length = None, 0
    return exchange


def check_user(site, exchange):
    """RequireUser (452) and RequireMatch (453, exact compare); RequireUser=N
    disables both, as in the original.  A verified client certificate's CN
    must also be the user (453), whichever front end passed both."""
    if not site.values['RequireUser']:
        return
    if not exchange.remote_user:
        raise HTTPStatusError(452, 'Remote user is undefined or null')
    cert_user = certificate_user(exchange.environ)
    if cert_user and cert_user != exchange.remote_user:
        raise HTTPStatusError(453, 'Remote user (%s) is not the client '
                              'certificate\'s CN (%s)' % (
                                  webjob.one_line(exchange.remote_user[:64]),
                                  webjob.one_line(cert_user[:64])))
    if site.values['RequireMatch'] and \
            exchange.remote_user != exchange.client_id:
        raise HTTPStatusError(453, 'Remote user (%s) does not match client ID '
                              '(%s)' % (webjob.one_line(exchange.remote_user),
                                        exchange.client_id))


def make_job_id(site):
    """<ServerId>_<epoch>_<NNNNN>, e.g. server_1_1085355126_00723."""
    return '%s_%d_%05d' % (site.values['ServerId'], int(site.clock()),
                           site.next_serial() % SERIAL_MODULUS)


def open_inside(site, path):
    """Open path for reading as (fd, fstat), or (fd, None) when it resolves
    to a file outside BaseDirectory (a link an administrator left in
    profiles/).  O_NONBLOCK: opening a FIFO must not wait for a writer.
    The file's real name is the kernel's for the open descriptor (one
    readlink of /proc/self/fd), else realpath and the same inode.

    :raises OSError: when path cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK)
    try:
        info = os.fstat(fd)
        try:
            real = os.readlink('/proc/self/fd/%d' % fd)
            there = info
        except OSError:         # no /proc: resolve the name, then compare
            real = os.path.realpath(path)
            there = os.stat(real)
    except OSError:
        os.close(fd)
        raise
    if not real.startswith(site.real_base + os.sep) or \
            (there.st_dev, there.st_ino) != (info.st_dev, info.st_ino):
        return fd, None
    return fd, info


def serve_get(site, exchange):
    """Open the client's program (or the common one) for the response.

    :raises HTTPStatusError: 404 when neither exists, 457 when it exists
        but cannot be opened as a regular file.
    """
    import errno  # late import: start-up time
    import stat  # late import: start-up time
    if not (exchange.job_id and site.values['JobQueueEnable']):
        exchange.job_id = make_job_id(site)     # a queued job keeps its own
    stored = hooked_name(site.values, exchange.filename)
    tried = []
    for folder in (exchange.client_id, COMMON_PROFILE):
        shown = '/'.join(('profiles', folder, 'commands',
                          stored or exchange.filename))
        path = os.path.join(site.profiles, folder, 'commands',
                            stored or exchange.filename)
        tried.append(shown)
        try:
            fd, info = open_inside(site, path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            raise HTTPStatusError(457, 'Requested file (%s) could not be '
                                  'opened (%s)' % (shown, exc.strerror))
        if info is None or not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise HTTPStatusError(457, 'Requested file (%s) is %s' % (
                shown, 'not a regular file' if info else 'a link to outside '
                'BaseDirectory'))
        if stored is not None:
            os.close(fd)
            run_get_hook(site, exchange, path, shown)
            return
        exchange.body = os.fdopen(fd, 'rb', 0)
        exchange.body_length = info.st_size
        signature = read_signature(site, path + '.sig')
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
    import signal  # late import: GetHook only
    import tempfile  # late import: GetHook only
    values = site.values
    command = expand_tokens(values['GetHookCommandLine'], dict(
        command_tokens(exchange), tp=path))
    limit = values['GetHookTimeLimit'] or None
    output = tempfile.TemporaryFile()
    errors = tempfile.TemporaryFile()
    try:
        proc = webjob.spawn(
            ['/bin/sh', '-c', command], stdin=webjob.DEVNULL,
            stdout=output, stderr=errors, cwd=os.path.dirname(path),
            env=command_environment())
        if webjob.wait_with_deadline(proc, limit, signal.SIGKILL):
            raise HTTPStatusError(457, 'GetHook for %s killed when '
                                  'GetHookTimeLimit (%d s) expired'
                                  % (shown, limit))
        status = proc.returncode
        if status != 0:
            errors.seek(0)
            why = first_line(errors.read(MAX_STDERR_LINE))
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


def read_signature(site, path):
    """The .sig beside a payload: one line of base64, at most 255 characters
    once stripped; None when absent, not a regular file inside
    BaseDirectory, or not in that form (DSV, 1.9)."""
    import stat  # late import: start-up time
    try:
        fd, info = open_inside(site, path)
    except OSError:
        return None
    try:
        if info is None or not stat.S_ISREG(info.st_mode):
            return None
        data = os.read(fd, MAX_SIGNATURE + 64).strip()
    except OSError:
        return None
    finally:
        os.close(fd)
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
    prefix, suffix = group_affixes(site, exchange)

    def store():
        exchange.group, note = store_upload(site, stdin, prefix, suffix,
                                            lengths, exchange.job_id)
        conclude_upload(site, exchange, note)
    store_once(site, exchange, stdin, lengths, store)


def conclude_upload(site, exchange, note):
    """Answer a stored upload 200, judge the job from its .env, and tie it
    to its queue entry when the JOB extension handed it out."""
    path = os.path.join(site.incoming, exchange.group + '.')
    why = judge_upload(read_key_values(path + 'env'),
                       os.path.exists(path + FLAG_EXTENSION))
    if site.values['JobQueueEnable']:
        note += record_result(site, exchange.client_id, exchange.job_id,
                              exchange.group, why)
    exchange.status = 200
    exchange.message = ('Stored; job failed: %s' % '; '.join(why) if why
                        else 'Success') + note


def group_affixes(site, exchange):
    """(prefix, suffix) of a new group's name around its serial number:
    '<ClientId>_<YYYYMMDDHHMMSS>_' and '_<FILENAME>'.

    :raises HTTPStatusError: 450 when the name would be too long.
    """
    import time  # late import: start-up time
    now = site.clock()
    stamp = time.strftime('%Y%m%d%H%M%S', (time.gmtime if site.values['UseGMT']
                                           else time.localtime)(now))
    prefix = '%s_%s_' % (exchange.client_id, stamp)
    suffix = '_' + exchange.filename
    if len(prefix) + 5 + len(suffix) + len('..env') > NAME_MAX:
        raise HTTPStatusError(450, 'Invalid query string: FILENAME too long '
                              'for a name in incoming/')
    return prefix, suffix


def store_once(site, exchange, stdin, lengths, store):
    """Store a PUT, or recognise a re-send of an upload already stored.

    A client that lost the answer to a PUT sends it again, naming the
    upload in a WebJob-Upload-Id header (the delivery extension).  Such an
    upload is identified by its ClientId and that id, and is the same upload
    when FILENAME, the three lengths and the .env's bytes (which hold the
    job's StdOutHash and StdErrHash) are the same: a re-send is drained and
    answered 253, nothing stored; a different upload under a stored identity
    is refused with 451.  A copy flagged .bad does not count, so a clean
    re-send is stored beside it.  One index file per identity
    (logfiles/nph-webjob-uploads/) is locked while its upload is written, so
    a re-send that overtakes its first copy waits for it (503 after
    UPLOAD_WAIT seconds).  Without the header: the original behaviour.
    """
    upload_id = exchange.environ.get(UPLOAD_ID_VARIABLE, '')
    if not upload_id:
        store()
        return
    if not is_job_id(upload_id):
        raise HTTPStatusError(450, 'Invalid WebJob-Upload-Id header (%s)'
                              % webjob.one_line(upload_id[:64]))
    fd = lock_upload_index(site, exchange.client_id, upload_id)
    storing = False
    try:
        entry = read_key_values_fd(fd)
        if entry.get('State') == 'storing':     # its writer died mid-way
            entry = find_stored_upload(site, exchange, upload_id)
        if entry.get('Group') and entry.get('Flagged') != 'Y':
            answer_resend(exchange, stdin, lengths, entry)
            return
        write_index(fd, [('ClientId', exchange.client_id),
                         ('UploadId', upload_id), ('State', 'storing')])
        storing = True
        store()
        write_index(fd, upload_entry(site.incoming, exchange, upload_id))
    except BaseException:
        if storing and exchange.group is None:    # nothing was stored
            write_index(fd, [])
        raise
    finally:
        os.close(fd)


def lock_upload_index(site, client_id, upload_id):
    """Open and flock the index file of one upload identity.

    :raises HTTPStatusError: 503 while another request holds it too long.
    """
    import fcntl  # late import: PUT with a Job-Id only
    import hashlib  # late import: PUT with a Job-Id only
    import time  # late import: start-up time
    folder = os.path.join(site.logfiles, UPLOAD_INDEX)
    if not os.path.isdir(folder):
        os.makedirs(folder, 0o755, exist_ok=True)
    name = hashlib.sha256(('%s\n%s' % (client_id, upload_id)).encode(
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
                raise HTTPStatusError(503, 'Upload (%s) is still being '
                                      'stored by another request'
                                      % upload_id)
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


def upload_entry(incoming, exchange, upload_id):
    """The index record of the group an upload was stored as."""
    path = os.path.join(incoming, exchange.group + '.')
    return [('ClientId', exchange.client_id), ('UploadId', upload_id),
            ('Filename', exchange.filename), ('Group', exchange.group),
            ('Lengths', ','.join(str(os.path.getsize(path + ext))
                                 for ext in STREAM_EXTENSIONS)),
            ('EnvSHA256', hash_file(path + 'env', ['SHA256'])['SHA256']),
            ('Flagged', 'Y' if os.path.exists(path + FLAG_EXTENSION)
             else 'N')]


def find_stored_upload(site, exchange, upload_id):
    """After a crash mid-store: the complete group of this identity, found
    by its .rdy's Jid, as an index record; {} when there is none."""
    head = exchange.client_id + '_'
    tail = '_%s.rdy' % exchange.filename
    for name in sorted(os.listdir(site.incoming)):
        if name.startswith(head) and name.endswith(tail) and \
                read_key_values(os.path.join(site.incoming, name)).get(
                    'Jid') == upload_id:
            exchange.group = name[:-4]
            try:
                return dict(upload_entry(site.incoming, exchange, upload_id))
            finally:
                exchange.group = None
    return {}


def answer_resend(exchange, stdin, lengths, entry):
    """Drain a PUT whose identity is stored; 253 when it is the same
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
        raise HTTPStatusError(451, 'Upload (%s) is already stored as %s, '
                              'with other contents; refused'
                              % (entry.get('UploadId'), entry.get('Group')))
    exchange.status = 253
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
             % (status, STATUS_REASONS.get(status) or HTTP_REASONS[status])]
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
# Partial uploads #############################################################
###############################################################################

# INFO: an extension, off until PartialUploadEnable=Y, modelled on the IETF
# resumable-upload draft (HEAD asks for the offset the server holds, PATCH
# appends at an offset that must match, 409 gives the right one).  The
# client names the upload with a random Upload-Key instead of receiving a
# Location in a 104 answer: a CGI behind Apache or nginx cannot send an
# interim response.  An upload is the PUT body (out, err, env back to back)
# or, while the program runs, out and err appended apart (Upload-Stream);
# it lives in incoming/.partial/<ClientId>_<key>/, which is no group and
# holds no final name, until the PATCH that completes it makes the group.

PARTIAL_METHODS = ('HEAD', 'PATCH')
PARTIAL_FOLDER = '.partial'             # under incoming/: same file system
PARTIAL_STREAMS = ('out', 'err')        # Upload-Stream values
PARTIAL_DONE = 'done'                   # the group a committed upload made
PARTIAL_LOCK = 'lock'
PARTIAL_LOCK_WAIT = 10.0                # seconds an append waits its turn
UPLOAD_KEY_LENGTH = 32                  # lower-case hex (128 random bits)
UPLOAD_FIELDS = ('Upload-Key', 'Upload-Stream', 'Upload-Offset',
                 'Upload-Complete')


def partial_names(environ):
    """The query a partial request carries: the PUT's (with the three
    lengths) for the whole body, the GET's for one stream."""
    query = environ.get('QUERY_STRING', '')
    return PUT_PARAMETERS if 'STDOUT_LENGTH=' in query else GET_PARAMETERS


def read_upload_fields(environ):
    """(key, stream or None, offset or None, complete) from the Upload-*
    request fields, each checked before it names a file.

    :raises HTTPStatusError: 450 naming the field.
    """
    key = environ.get('HTTP_UPLOAD_KEY', '')
    if len(key) != UPLOAD_KEY_LENGTH or not set(key) <= set('0123456789abcdef'):
        raise HTTPStatusError(450, 'Invalid Upload-Key: expected %d lower-case'
                              ' hex digits' % UPLOAD_KEY_LENGTH)
    stream = environ.get('HTTP_UPLOAD_STREAM')
    if stream is not None and stream not in PARTIAL_STREAMS:
        raise HTTPStatusError(450, 'Invalid Upload-Stream: expected out or '
                              'err')
    offset = environ.get('HTTP_UPLOAD_OFFSET')
    if offset is not None:
        if not _is_ascii_digits(offset):
            raise HTTPStatusError(450, 'Invalid Upload-Offset: expected '
                                  'digits')
        offset = int(offset)
    complete = environ.get('HTTP_UPLOAD_COMPLETE', '?0')
    if complete not in ('?0', '?1'):
        raise HTTPStatusError(450, 'Invalid Upload-Complete: expected ?0 or '
                              '?1')
    return key, stream, offset, complete == '?1'


def sync_held(fd, size):
    """Bytes appended to fd since it held size, once fsynced as it is (a
    later SIGTERM is ignored: catch_termination)."""
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size - size
    except OSError:
        return 0


class Partial(object):
    """One upload in progress: its folder and what each stream holds."""

    def __init__(self, site, client_id, key):
        self.root = os.path.join(site.incoming, PARTIAL_FOLDER)
        self.folder = os.path.join(self.root, '%s_%s' % (client_id, key))
        self.lock_fd = None

    def path(self, ext):
        return os.path.join(self.folder, ext)

    def held(self):
        """Bytes held of out, err and env (0 for a stream not begun)."""
        sizes = []
        for ext in STREAM_EXTENSIONS:
            try:
                sizes.append(os.lstat(self.path(ext)).st_size)
            except OSError:
                sizes.append(0)
        return sizes

    def done_group(self):
        """The group this upload became, or None while it is partial."""
        try:
            with open(self.path(PARTIAL_DONE), 'rb') as handle:
                return handle.read(NAME_MAX).decode('ascii').strip() or None
        except (OSError, UnicodeError):
            return None

    def lock(self):
        """Create the folder if new, then hold its lock (one writer).

        :raises HTTPStatusError: 409 while another request keeps it.
        """
        import fcntl  # late import: partial uploads only
        import time  # late import: start-up time
        if not os.path.isdir(self.folder):
            os.makedirs(self.folder, 0o700, exist_ok=True)
            webjob.fsync_folder(self.root)
        self.lock_fd = os.open(self.path(PARTIAL_LOCK), os.O_WRONLY |
                               os.O_CREAT | _O_NOFOLLOW, 0o600)
        end = time.monotonic() + PARTIAL_LOCK_WAIT
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                if time.monotonic() > end:
                    self.unlock()
                    raise HTTPStatusError(409, 'Partial upload busy: another '
                                          'request is appending to it')
                time.sleep(0.05)    # poll interval while another appends

    def unlock(self):
        if self.lock_fd is not None:
            os.close(self.lock_fd)      # INFO: closing releases the flock
            self.lock_fd = None

    def append(self, ext, stdin, count):
        """Append the next count body bytes to one stream, fsynced even when
        the body ends early: what arrived is held for the next attempt.

        :raises HTTPStatusError: 456 when the body ends early.
        """
        path = self.path(ext)
        new = not os.path.lexists(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                     _O_NOFOLLOW, 0o600)
        try:
            size = os.fstat(fd).st_size
            digests = take_running(self.folder, ext, size)
            if digests is not None:
                digests.begin(count)
            try:
                done, why = copy_stream(ArrivingBody(stdin), fd, count,
                                        digests)
                os.fsync(fd)
            except Terminated as exc:
                # the web server ended the CGI mid-append (a write, the
                # fsync): what reached the file is held all the same, and
                # its running digests are dropped (the commit reads it back)
                if digests is not None:
                    digests.end()
                digests = None
                done, why = sync_held(fd, size), exc.message
            finally:
                if digests is not None:
                    digests.end()
            if digests is not None:
                keep_running(self.folder, ext, size + done, digests)
        finally:
            os.close(fd)
        if new:
            webjob.fsync_folder(self.folder)
        if done != count:
            raise HTTPStatusError(456, 'Partial upload: %d of %d bytes '
                                  'received for %s (%s); %d held' % (
                                      done, count, ext, why,
                                      os.path.getsize(path)))


#: (partial folder, stream) -> (bytes hashed, StreamDigests), this process:
#: kept only by a long-lived process (the standalone server), so the
#: completing PATCH need not read the stream back; a CGI reads it back.
RUNNING_DIGESTS = {}
MAX_RUNNING = 1024              # streams followed at once; then the oldest go


def take_running(folder, ext, size):
    """The StreamDigests of a stream whose first size bytes they hashed;
    a fresh one for an empty stream; else None (read it back at the end)."""
    found = RUNNING_DIGESTS.pop((folder, ext), None)
    if found is not None and found[0] == size:
        return found[1]
    return StreamDigests(0, ASIDE_HASHES) if size == 0 else None


def keep_running(folder, ext, size, digests):
    while len(RUNNING_DIGESTS) >= MAX_RUNNING:
        RUNNING_DIGESTS.pop(next(iter(RUNNING_DIGESTS)), None)
    RUNNING_DIGESTS[(folder, ext)] = (size, digests)


class ArrivingBody(object):
    """A body read as it arrives (read1 where the stream has it), so the
    bytes of a cut PATCH are on disk even when the web server kills the CGI
    instead of ending its input (Apache's mod_cgi on a client abort)."""

    def __init__(self, stdin):
        self.read = getattr(stdin, 'read1', None) or stdin.read


def body_offset(held, lengths):
    """The first byte of the PUT body (out, err, env back to back) that the
    server does not hold.

    :raises HTTPStatusError: 456 when a stream holds more than declared.
    """
    position = 0
    for ext, have, length in zip(STREAM_EXTENSIONS, held, lengths):
        if have > length:
            raise HTTPStatusError(456, 'Partial upload: %s holds %d bytes, '
                                  'more than its declared %d' % (ext, have,
                                                                 length))
        if have < length:
            return position + have
        position += length
    return position


def serve_partial(site, exchange, query, stdin):
    """HEAD: answer the offset held.  PATCH: append at the offset, which
    must match (else 409 with the right one), and when the body is whole
    and Upload-Complete is ?1, store the group.

    :raises HTTPStatusError: 409, 450, 454, 455, 456 or 451.
    """
    environ = exchange.environ
    key, stream, offset, complete = read_upload_fields(environ)
    if query['RUNTYPE'] == 'linktest':
        raise HTTPStatusError(450, 'Partial upload: RUNTYPE=linktest is a '
                              'plain PUT (nothing is kept)')
    whole = 'STDOUT_LENGTH' in query
    if whole == (stream is not None):
        raise HTTPStatusError(450, 'Partial upload: Upload-Stream goes with '
                              'the GET query, the stream lengths without it')
    lengths = [int(query[name]) for name in LENGTH_PARAMETERS] if whole \
        else None
    partial = Partial(site, exchange.client_id, key)
    if exchange.method == 'HEAD':
        answer_offset(exchange, partial, stream, lengths)
        return
    count = read_patch_length(site, exchange, offset)
    if not os.path.isdir(partial.folder):
        note = expire_partials(site, partial.root)
        exchange.message = note
    partial.lock()
    try:
        group = partial.done_group()
        if group is not None:
            answer_stored(exchange, group, lengths, count == 0 and complete)
            return
        held = partial.held()
        if stream is not None:
            index = STREAM_EXTENSIONS.index(stream)
            expected = held[index]
            total = None
        else:
            expected = body_offset(held, lengths)
            total = sum(lengths)
        if offset != expected:
            exchange.headers.append(('Upload-Offset', str(expected)))
            raise HTTPStatusError(409, 'Partial upload: Upload-Offset (%d) '
                                  'does not match the %d bytes held' % (
                                      offset, expected))
        cap = site.values['MaxContentLength']
        if total is not None and offset + count > total:
            raise HTTPStatusError(456, 'Partial upload: %d bytes at offset %d'
                                  ' overrun the declared %d' % (count, offset,
                                                                total))
        if site.values['CapContentLength'] and (
                (total or 0) > cap or sum(held) + count > cap):
            raise HTTPStatusError(455, 'Partial upload: length exceeds maximum'
                                  ' allowed length (%d)' % cap)
        if stream is not None:
            partial.append(stream, stdin, count)
            held[index] += count
            exchange.headers.append(('Upload-Offset', str(held[index])))
        else:
            append_body(partial, stdin, offset, count, lengths)
            held = partial.held()
            if held == lengths and complete:
                commit_partial(site, exchange, partial, lengths)
                return
            exchange.headers.append(('Upload-Offset', str(offset + count)))
        exchange.status = 204
        exchange.message = ('Partial upload: %d bytes appended%s' % (
            count, ' to ' + stream if stream else '')) + exchange.message
    finally:
        partial.unlock()


def read_patch_length(site, exchange, offset):
    """A PATCH's Content-Length, which must be there, with an Upload-Offset.

    :raises HTTPStatusError: 454 or 450.
    """
    length = exchange.content_length
    if not length or not _is_ascii_digits(length):
        raise HTTPStatusError(454, 'Content length is undefined, null or not'
                              ' a number')
    if offset is None:
        raise HTTPStatusError(450, 'Partial upload: Upload-Offset missing')
    return int(length)


def append_body(partial, stdin, offset, count, lengths):
    """Split count bytes of the PUT body at offset over out, err and env;
    a stream written after the first must be empty so far.

    :raises HTTPStatusError: 409 for a stream that holds bytes out of turn.
    """
    start = 0
    held = partial.held()
    for ext, have, length in zip(STREAM_EXTENSIONS, held, lengths):
        end = start + length
        if count and offset < end:
            here = offset - start
            if here != have:
                raise HTTPStatusError(409, 'Partial upload: %s holds %d '
                                      'bytes, the body starts it at %d' % (
                                          ext, have, here))
            take = min(count, end - offset)
            partial.append(ext, stdin, take)
            offset += take
            count -= take
        start = end


def answer_offset(exchange, partial, stream, lengths):
    """The HEAD answer: 204 with the offset held, Upload-Complete ?1 once
    the upload is a group."""
    group = partial.done_group()
    held = partial.held()
    if group is not None:
        offset = sum(lengths) if lengths else 0
        exchange.headers.append(('Upload-Complete', '?1'))
        exchange.message = 'Partial upload: stored as %s' % group
    elif stream is not None:
        offset = held[STREAM_EXTENSIONS.index(stream)]
        exchange.message = 'Partial upload: %d bytes of %s held' % (offset,
                                                                   stream)
    else:
        offset = body_offset(held, lengths)
        exchange.message = 'Partial upload: %d bytes held' % offset
    exchange.headers.insert(0, ('Upload-Offset', str(offset)))
    exchange.status = 204


def answer_stored(exchange, group, lengths, finished):
    """A PATCH for an upload already stored: 200 for the completing PATCH
    sent again (its answer was lost), else 409; never a second group."""
    exchange.group = None
    exchange.headers.append(('Upload-Offset', str(sum(lengths or ()))))
    exchange.headers.append(('Upload-Complete', '?1'))
    if not finished or lengths is None:
        raise HTTPStatusError(409, 'Partial upload: already stored as %s'
                              % group)
    exchange.status = 200
    exchange.message = 'Success: already stored as %s' % group


def commit_partial(site, exchange, partial, lengths):
    """Make the held streams a group: hash them against the .env, link them
    to their final names, manifest, .rdy last; then record the group and
    drop the partial.  Until .rdy is written the partial stays whole, so a
    failure leaves it to be completed again."""
    incoming = site.incoming
    exchange.job_id = exchange.job_id or make_job_id(site)
    prefix, suffix = group_affixes(site, exchange)
    group, lock, lock_fd = claim_group(incoming, prefix, suffix,
                                       site.next_serial())
    sources = [partial.path(ext) for ext in STREAM_EXTENSIONS]
    made = [lock]
    note = ''
    try:
        for source in sources:
            if not os.path.exists(source):      # an empty stream
                os.close(os.open(source, os.O_WRONLY | os.O_CREAT |
                                 _O_NOFOLLOW, 0o600))
        finals = [os.path.join(incoming, group + '.' + ext)
                  for ext in STREAM_EXTENSIONS]
        manifest = []
        flag = None
        if site.values['IntegrityEnable']:
            declared = read_declared_hashes(sources[2])
            aside = tuple(set(ASIDE_HASHES + (declared[0] or 'SHA256',)) -
                          set(['SHA256']))
            sums = [held_digests(partial, ext, source, aside)
                    for ext, source in zip(STREAM_EXTENSIONS, sources)]
            note, flag = check_upload_hashes(declared, sums[0], sums[1])
            manifest = [(sums[n]['SHA256'], group + '.' + ext)
                        for n, ext in enumerate(STREAM_EXTENSIONS)]
        for source, final in zip(sources, finals):
            os.chmod(source, 0o644)
            os.link(source, final)
            made.append(final)
        record = ('Jid=%s\n' % exchange.job_id).encode('ascii')
        note += commit_group(site, group, lock, lock_fd, made, [], manifest,
                             flag, record)
    finally:
        os.close(lock_fd)       # INFO: releases the flock, after the commit
        if made:
            remove_files(made)
    record_done(partial, group)
    exchange.group = group
    exchange.headers.append(('Upload-Complete', '?1'))
    conclude_upload(site, exchange, note)


def held_digests(partial, ext, path, aside):
    """{HashType: hex} of a held stream: from its StreamDigests when this
    process hashed all of it as it came, else read back."""
    size = os.path.getsize(path)
    running = take_running(partial.folder, ext, size)
    if running is None:
        return digest_file(path, aside)
    found = running.sums()
    missing = [name for name in aside if name not in found]
    if missing:
        found.update(hash_file(path, missing))
    return found


def digest_file(path, aside):
    """StreamDigests of a held stream, read back in 1 MiB blocks: SHA-256
    here and the aside digests on the second core for a large one."""
    digests = StreamDigests(os.path.getsize(path), aside)
    try:
        with open(path, 'rb') as handle:
            copy_stream(handle, None, os.fstat(handle.fileno()).st_size,
                        digests)
    finally:
        found = digests.finish()
    return found


def io_bytes(data):
    import io  # late import: partial uploads only
    return io.BytesIO(data)


def record_done(partial, group):
    """Replace the held streams by the name of the group they became, so a
    lost answer is recognised when the upload is sent again."""
    temp = partial.path('.' + PARTIAL_DONE)
    write_stream(temp, io_bytes((group + '\n').encode('ascii')),
                 len(group) + 1)
    os.rename(temp, partial.path(PARTIAL_DONE))
    for ext in STREAM_EXTENSIONS:
        try:
            os.unlink(partial.path(ext))
        except OSError:
            pass
    webjob.fsync_folder(partial.folder)


def expire_partials(site, root):
    """Remove partial uploads untouched for PartialExpireTime seconds (and
    the records of stored ones); returns a note for the log message."""
    import fcntl  # late import: partial uploads only
    import shutil  # late import: partial uploads only
    limit = site.values['PartialExpireTime']
    if not limit:
        return ''
    now = site.clock()
    removed = 0
    for name, age, size in list_partials(root, now):
        if age < limit:
            continue
        folder = os.path.join(root, name)
        try:
            fd = os.open(os.path.join(folder, PARTIAL_LOCK), os.O_WRONLY |
                         os.O_CREAT | _O_NOFOLLOW, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return '; %d abandoned partial uploads expired' % removed if removed \
        else ''


def list_partials(root, now):
    """(name, seconds since last written, bytes held or None once stored)
    for each partial upload folder, sorted by name."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    found = []
    for name in names:
        folder = os.path.join(root, name)
        try:
            stamps = [os.lstat(folder).st_mtime]
            size = 0
            for ext in STREAM_EXTENSIONS + (PARTIAL_DONE,):
                try:
                    info = os.lstat(os.path.join(folder, ext))
                except OSError:
                    continue
                stamps.append(info.st_mtime)
                size = None if ext == PARTIAL_DONE else size + info.st_size
        except OSError:
            continue
        found.append((name, now - max(stamps), size))
    return found


def partial_findings(incoming, now=None):
    """verify's lines for partial uploads: each one not yet a group (the
    client keeps its copy and may resume it, or it expires)."""
    import time  # late import: tools only
    root = os.path.join(incoming, PARTIAL_FOLDER)
    return [(PARTIAL_FOLDER + '/' + name, 'partial', '%d bytes held, last '
             'written %d s ago' % (size, age))
            for name, age, size in list_partials(root, now or time.time())
            if size is not None]


###############################################################################
# CGI front end ###############################################################
###############################################################################

#: Gateways that parse a CGI's output whatever its name: a FastCGI wrapper
#: (fcgiwrap and libfcgi set FCGI_ROLE), or a server without NPH support.
#: An NPH status line sent to them is read as a header, and nginx then
#: answers 200 with an empty body: every error would look like a success.
REPARSING_VARIABLES = ('FCGI_ROLE',)
REPARSING_SERVERS = ('nginx', 'openresty', 'angie', 'lighttpd', 'caddy',
                     'h2o')


def wants_nph(environ, script):
    """NPH when the script's name starts with 'nph-' and the gateway passes
    the output through unparsed; a parsed-header answer otherwise, which
    an NPH gateway could only garble, never turn into a success."""
    if not os.path.basename(script).startswith('nph-'):
        return False
    if any(environ.get(name) for name in REPARSING_VARIABLES):
        return False
    software = environ.get('SERVER_SOFTWARE', '').lower()
    return not software.startswith(REPARSING_SERVERS)


def run_cgi(environ=None, stdin=None, stdout=None):
    """Answer the one request of a CGI process; NPH when the script's name
    (SCRIPT_FILENAME, else argv[0]) and the gateway allow it (wants_nph)."""
    environ = os.environ if environ is None else environ
    script = environ.get('SCRIPT_FILENAME') or sys.argv[0]
    nph = wants_nph(environ, script)
    os.umask(0o022)
    catch_termination()     # INFO: a cut PATCH fsyncs what it had, logs 456
    stdout = stdout or sys.stdout.buffer
    handle_request(environ, stdin or sys.stdin.buffer, stdout, nph=nph,
                   extra_headers=[('Connection', 'close')] if nph else ())
    stdout.flush()
    return 0


def catch_termination():
    """Make the first SIGTERM or SIGHUP a Terminated exception, and ignore
    any later one, so the clean-up it starts runs to its end.  SIGPIPE is
    already ignored by Python: a gone reader is an EPIPE error, logged.

    The C module _signal, not signal: signal's enums cost a CGI request
    2.7 ms of start-up (3.13) for two constants.
    """
    import _signal as signal  # late import: CGI only

    def terminate(signum, frame):
        for name in ('SIGTERM', 'SIGHUP'):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        raise Terminated(500, 'Terminated by signal (%d) before the answer: '
                         'the web server ended the CGI (client gone or '
                         'timeout)' % signum)

    for name in ('SIGTERM', 'SIGHUP'):
        signal.signal(getattr(signal, name), terminate)


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


def find_unreachable(path, mode):
    """The first of path's folders that other users cannot enter, or path
    itself when they lack mode (os.R_OK, os.X_OK) on it; None when a web
    server's user (www-data), which is neither owner nor root, could use
    it.  Only the 'other' permission bits count."""
    import stat  # late import: install-cgi only
    path = os.path.realpath(path)
    folder = os.path.dirname(path)
    folders = []
    while folder != os.path.dirname(folder):
        folders.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(folders):
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    want = {os.R_OK: stat.S_IROTH, os.X_OK: stat.S_IXOTH}[mode]
    if os.path.exists(path) and not os.stat(path).st_mode & want:
        return path
    return None


def check_cgi_reachable(path):
    """Refuse a stub the web server could not run: its interpreter, the two
    modules it imports and the stub's folder must be usable by others.

    :raises webjob.WebJobError: naming the first path that is not.
    """
    checks = [(sys.executable, os.X_OK, 'the interpreter')]
    checks += [(os.path.join(_HERE, name), os.R_OK, name)
               for name in ('nph_webjob.py', 'webjob.py')]
    checks.append((os.path.abspath(path), os.R_OK, 'the CGI script'))
    for target, mode, what in checks:
        blocked = find_unreachable(target, mode)
        if blocked is not None:
            raise webjob.WebJobError(
                'install-cgi: %s (%s): other users cannot %s %s, so the web '
                'server could not run the CGI; use an interpreter and folders '
                'they can reach (e.g. /usr/bin/python3 and /opt/webjob), or '
                '--force' % (what, target, 'enter' if blocked != os.path.
                             realpath(target) else 'use', blocked))


def install_cgi(path, config=None, force=False):
    """Write the CGI stub at path (temporary name, fsync, rename) for this
    interpreter and compile the modules it imports; 0 when done.  Unless
    forced, refuse when the web server's user could not run it."""
    if not force:
        check_cgi_reachable(path)
    compile_modules(_HERE)
    if config is not None:
        config = 'import os\nos.environ.setdefault(%r, %r)\n' % (
            CONFIG_VARIABLE, os.path.abspath(config))
    text = CGI_STUB % {'python': sys.executable, 'folder': _HERE,
                       'name': os.path.basename(path), 'config': config or ''}
    try:
        webjob.replace_file(path, text.encode('utf-8'), 0o755)
    except OSError as exc:
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


#: What an unknown user's password is checked against when the file is
#: empty (htpasswd -m of a random word), so refusing costs the same.
DUMMY_HASH = '$apr1$Qw3rTy12$2mV0b5mYvCk0bF2pQ5gk1/'


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
    if not webjob.is_digits(digits):
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
# Standalone: identity, serial numbers, graceful stop #########################
###############################################################################

class SerialCounter(object):
    """The standalone server's serial numbers (job ids and group names).

    They continue across restarts and are shared by every server on the
    locker with the same ServerId: the next free number is kept in
    logfiles/nph-webjob-serial.<ServerId>, and each server reserves
    SERIAL_BLOCK numbers at a time under flock (one fsynced write per
    block; a killed server skips the rest of its block).  So neither a
    restart within the same second nor a second server repeats an id.
    """

    def __init__(self, path):
        import threading  # late import: standalone only
        self.path = path
        self.lock = threading.Lock()
        self.next = self.limit = 0
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW,
                              0o644)
        except OSError as exc:
            raise webjob.WebJobError('%s: %s' % (path, exc.strerror or exc))
        self.reserve()

    def reserve(self):
        """Take the next SERIAL_BLOCK numbers of the file for this server.

        :raises webjob.WebJobError: when the file is damaged.
        """
        import fcntl  # late import: standalone only
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            text = os.pread(self.fd, 64, 0).decode('ascii', 'replace').strip()
            key, _, value = text.partition('=')
            if text and (key != 'NextSerial' or not webjob.is_digits(value)):
                raise webjob.WebJobError(
                    '%s: damaged (expected NextSerial=<digits>): remove it to '
                    'start again from 1' % self.path)
            self.next = int(value) if text else 1
            self.limit = self.next + SERIAL_BLOCK
            os.pwrite(self.fd, ('NextSerial=%020d\n' % self.limit).encode(
                'ascii'), 0)
            os.fsync(self.fd)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def __call__(self):
        with self.lock:
            if self.next >= self.limit:
                self.reserve()
            value = self.next
            self.next += 1
            return value


def raise_file_limit():
    """Lift the soft descriptor limit to the hard one: systemd's default
    soft limit (1024) would refuse connections long before the threads run
    out (every connection is a descriptor, every upload up to four more)."""
    import resource  # late import: standalone only
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class Connections(object):
    """The standalone server's open connections by descriptor, each marked
    busy while a request is in the application, so a stop can close the
    idle ones at once and give the busy ones STOP_GRACE seconds."""

    def __init__(self):
        import threading  # late import: standalone only
        self.cond = threading.Condition()
        self.busy = {}          # descriptor -> in a request
        self.stopping = False

    def add(self, fd):
        with self.cond:
            self.busy[fd] = False

    def remove(self, fd):
        with self.cond:
            self.busy.pop(fd, None)
            self.cond.notify_all()

    def mark(self, fd, busy):
        """Set or clear a connection's busy mark; True once stopping (the
        answer then closes the connection)."""
        with self.cond:
            if fd in self.busy:
                self.busy[fd] = busy
            self.cond.notify_all()
            return self.stopping

    def stop(self, grace, linger=STOP_LINGER):
        """Close idle connections; wait up to grace seconds for the busy
        ones, then cut them (their uploads end as 456, cleaned up and
        logged) and wait up to linger seconds for their handlers to finish.
        Returns the number of requests that were cut."""
        import time  # late import: standalone only
        deadline = time.monotonic() + grace
        with self.cond:
            self.stopping = True
            self.cut(fd for fd, busy in self.busy.items() if not busy)
            while any(self.busy.values()) and time.monotonic() < deadline:
                self.cond.wait(max(0.01, deadline - time.monotonic()))
            cut = [fd for fd, busy in self.busy.items() if busy]
            self.cut(self.busy)
            deadline = time.monotonic() + linger
            while self.busy and time.monotonic() < deadline:
                self.cond.wait(max(0.01, deadline - time.monotonic()))
        return len(cut)

    @staticmethod
    def cut(fds):
        """shutdown(2) each connection: its reader sees the end at once.
        A duplicate descriptor is shut down, so TLS state is not touched
        from this thread and the handler still closes its own."""
        import socket  # late import: standalone only
        for fd in list(fds):
            try:
                sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
            except OSError:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.close()


def wait_for_signal(caught):
    """Sleep until a signal handler has appended to caught.

    The kernel may deliver SIGTERM to any thread, and only the main thread
    runs Python's handlers: a wake-up pipe the C handler writes to ends
    the main thread's wait whichever thread the signal hit.
    """
    import signal  # late import: standalone only
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    try:
        while not caught:
            os.read(read_end, 64)
    finally:
        signal.set_wakeup_fd(-1)
        os.close(read_end)
        os.close(write_end)


def log_connection_error(site, address, exc):
    """One log line for a connection that failed before its request reached
    the application (reset, cut off, TLS handshake), which the server saw
    but could not answer.  A TLS peer that closes without a close_notify
    (a client's probe handshake: SSLEOFError, or on Python 3.6 with
    OpenSSL 3 an SSLError 'unexpected eof') has sent no request: one line
    on stderr."""
    ssl = sys.modules.get('ssl')        # INFO: imported when TLS is on
    if ssl is not None and isinstance(exc, ssl.SSLError) and \
            'eof' in str(exc).lower():
        write_stderr('%s: connection closed: %s' % (address, exc))
        return
    exchange = Exchange({'REMOTE_ADDR': address})
    exchange.status = 400
    exchange.message = 'Connection error before a complete request: %s: %s' \
        % (type(exc).__name__, exc)
    log_exchange(exchange, site)


###############################################################################
# Standalone front end ########################################################
###############################################################################

#: The standalone server's bounds on what it reads before authenticating:
#: a request is refused (and logged) as soon as it passes one, so twenty
#: hostile connections hold at most 20 x MAX_HEAD bytes.
MAX_REQUEST_LINE = 8192         # bytes of the request line (414 beyond)
MAX_HEAD = 32768                # bytes of the whole head (431 beyond)
MAX_HEADER_FIELDS = 64          # header lines (431 beyond)
HEAD_TIME_LIMIT = 30            # seconds a begun head may take (408 beyond)
TOKEN_CHARS = frozenset(_ALNUM + "!#$%&'*+-.^_`|~")
TARGET_CHARS = frozenset(chr(code) for code in range(0x21, 0x7f))
FIELD_VALUE_BAD = frozenset(chr(code) for code in range(0x20)
                            if code != 9) | frozenset('\x7f')
HTTP_VERSIONS = ('HTTP/1.1', 'HTTP/1.0')


class HeadError(Exception):
    """A request head the standalone server refuses before the handler:
    status (an HTTP_REASONS key), the log message, and the method when the
    request line got that far."""

    def __init__(self, status, message, method=''):
        Exception.__init__(self, message)
        self.status = status
        self.message = message
        self.method = method


class RequestHead(object):
    """One parsed request head: method, target, version and the header
    fields as (lower-case name, value) pairs in their order."""

    def __init__(self, method, target, version, fields):
        self.method = method
        self.target = target
        self.version = version
        self.fields = fields

    def get_all(self, name):
        return [value for key, value in self.fields if key == name]

    def get(self, name, default=None):
        values = self.get_all(name)
        return values[0] if values else default

    def connection_tokens(self):
        return set(token.strip().lower() for value in
                   self.get_all('connection') for token in value.split(','))


def parse_request_line(line):
    """(method, target, version) from 'METHOD SP /target SP HTTP/1.x'.

    :raises HeadError: 400 for anything else, 505 for another version.
    """
    parts = line.split(' ')
    method = parts[0] if parts and set(parts[0]) <= TOKEN_CHARS else ''
    if len(parts) != 3 or not method:
        raise HeadError(400, 'Request line is not "METHOD /target '
                        'HTTP/1.x" (%d words)' % len(parts), method)
    target, version = parts[1], parts[2]
    if not target.startswith('/') or not set(target) <= TARGET_CHARS:
        raise HeadError(400, 'Request target is not an origin path of '
                        'visible ASCII', method)
    if version not in HTTP_VERSIONS:
        number = version[5:].split('.')
        if version.startswith('HTTP/') and len(number) == 2 and \
                all(webjob.is_digits(n) and len(n) < 3 for n in number):
            raise HeadError(505, 'HTTP version (%s) not supported'
                            % version, method)
        raise HeadError(400, 'Request line names no HTTP version', method)
    return method, target, version


def parse_header_field(line, method):
    """(lower-case name, value) of one header line; RFC 9112 5: no space
    before the colon, no folded lines, no control characters.

    :raises HeadError: 400.
    """
    name, colon, value = line.partition(':')
    if not colon or not name or not set(name) <= TOKEN_CHARS:
        raise HeadError(400, 'Header line is not "Name: value" (%s)' % (
            'continuation line' if line[:1] in ' \t' else
            'space or bad character in the name' if colon and name else
            'no name'), method)
    value = value.strip(' \t')
    if not FIELD_VALUE_BAD.isdisjoint(value):
        raise HeadError(400, 'Header field (%s) holds a control character'
                        % name[:32], method)
    return name.lower(), value


def parse_head(data):
    """A RequestHead from the bytes of one head (through its empty line).

    Lines end in CRLF or LF; a CR anywhere else, a non-ASCII request line
    or more than MAX_HEADER_FIELDS fields are refused.

    :raises HeadError: 400, 431 or 505.
    """
    lines = data.split(b'\n')
    if lines[-1:] == [b'']:
        lines.pop()
    lines = [line[:-1] if line.endswith(b'\r') else line for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise HeadError(400, 'Empty request head')
    try:
        request_line = lines[0].decode('ascii')
    except UnicodeError:
        raise HeadError(400, 'Request line is not ASCII')
    if '\r' in request_line:
        raise HeadError(400, 'Request line holds a bare CR')
    method, target, version = parse_request_line(request_line)
    if len(lines) - 1 > MAX_HEADER_FIELDS:
        raise HeadError(431, 'More than %d header fields' % MAX_HEADER_FIELDS,
                        method)
    fields = [parse_header_field(line.decode('latin-1'), method)
              for line in lines[1:]]
    return RequestHead(method, target, version, fields)


class RequestReader(object):
    """Reads request heads and bodies off one connection, never more than
    the bounds above before a head is parsed, and never waiting past
    HEAD_TIME_LIMIT for a head once its first byte has come."""

    def __init__(self, sock, idle_timeout=IDLE_TIMEOUT):
        self.sock = sock
        self.idle_timeout = idle_timeout
        self.buffer = b''
        self.seen = 0           # bytes of the current head received

    def receive(self, timeout):
        """More bytes into the buffer; False at the end of the stream."""
        self.sock.settimeout(max(timeout, 0.001))
        data = self.sock.recv(65536)
        self.buffer += data
        self.seen += len(data)
        return bool(data)

    def read_head(self):
        """The next head's bytes, or b'' when the peer closes or stays idle
        before sending one.  Empty lines before a request line are skipped.

        :raises HeadError: 400 for a head cut off, 408 for one too slow,
            414 and 431 for one too long.
        """
        import socket  # late import: standalone only
        import time  # late import: start-up time
        deadline = None
        self.seen, scanned, skipped = len(self.buffer), 0, 0
        while True:
            if self.buffer[:1] in (b'\r', b'\n'):
                size = len(self.buffer)
                self.buffer = self.buffer.lstrip(b'\r\n')
                skipped += size - len(self.buffer)
                scanned = 0
            end = self.find_end(scanned)
            self.check_size(len(self.buffer) if end is None else end)
            if end is not None:
                head, self.buffer = self.buffer[:end], self.buffer[end:]
                return head
            scanned = max(len(self.buffer) - 2, 0)
            if deadline is None and self.buffer:
                deadline = time.monotonic() + HEAD_TIME_LIMIT
            why = 'the connection was closed'
            try:
                more = self.receive(self.idle_timeout if deadline is None
                                    else deadline - time.monotonic())
            except socket.timeout:
                if self.seen == skipped:
                    return b''
                raise HeadError(408, 'Request head not complete within %d s '
                                '(%d bytes)' % (HEAD_TIME_LIMIT, self.seen),
                                self.method_so_far())
            except OSError as exc:
                more, why = False, exc.strerror or str(exc)
            if not more:
                if self.seen > skipped:
                    raise HeadError(400, 'Request head cut off after %d '
                                    'bytes: %s' % (self.seen, why),
                                    self.method_so_far())
                return b''

    def find_end(self, start):
        """The index just past the empty line that ends the head, or None."""
        index = self.buffer.find(b'\n', start)
        while index >= 0:
            if self.buffer[index + 1:index + 2] == b'\n':
                return index + 2
            if self.buffer[index + 1:index + 3] == b'\r\n':
                return index + 3
            index = self.buffer.find(b'\n', index + 1)
        return None

    def check_size(self, size):
        """414 or 431 as soon as the head so far (the buffer's first size
        bytes, and the empty lines skipped before it) passes a bound."""
        first = self.buffer.find(b'\n', 0, size)
        if (first if first >= 0 else size) > MAX_REQUEST_LINE:
            raise HeadError(414, 'Request line longer than %d bytes'
                            % MAX_REQUEST_LINE, self.method_so_far())
        if self.seen - len(self.buffer) + size > MAX_HEAD:
            raise HeadError(431, 'Request head longer than %d bytes'
                            % MAX_HEAD, self.method_so_far())

    def method_so_far(self):
        """The method of a head refused before parsing, when it is a token."""
        word = self.buffer[:64].split(b' ', 1)[0]
        try:
            word = word.decode('ascii')
        except UnicodeError:
            return ''
        return word if word and set(word) <= TOKEN_CHARS else ''

    def read(self, size):
        """Up to size body bytes: what the buffer holds, else one recv."""
        if not self.buffer:
            self.sock.settimeout(self.idle_timeout)
            return self.sock.recv(min(size, BLOCK_SIZE))
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data


class _Body(object):
    """The request body: at most Content-Length bytes of the connection."""

    def __init__(self, reader, length):
        self.reader = reader
        self.remaining = length

    def read(self, size):
        if not self.remaining:
            return b''
        data = self.reader.read(min(size, self.remaining))
        self.remaining -= len(data)
        return data


class _SocketOut(object):
    """Response writer for a plain socket: sendall, and sendfile for bodies."""

    def __init__(self, sock):
        self.write = sock.sendall
        self.sendfile = sock.sendfile


class Authentication(object):
    """The standalone server's schemes: client certificates and htpasswd.

    The htpasswd file is read again whenever its size, time or inode
    changes (one stat per request), so revoking a client needs no restart;
    a file that cannot be read then refuses everyone until it can.
    """

    def __init__(self, client_ca=None, htpasswd=None):
        self.client_ca = client_ca
        self.htpasswd = htpasswd
        self.stamp = None
        self.users = {}
        if htpasswd:
            self.stamp = self.stamp_of(htpasswd)
            self.users = read_htpasswd(htpasswd)    # at start: fail loudly

    @property
    def enabled(self):
        return bool(self.client_ca) or self.htpasswd is not None

    @property
    def passwords(self):
        """{user: hash} as the file is now; None without --htpasswd."""
        if not self.htpasswd:
            return None
        stamp = self.stamp_of(self.htpasswd)
        if stamp != self.stamp:
            try:
                users = read_htpasswd(self.htpasswd)
                write_stderr('htpasswd: %s: read again (%d users)' % (
                    self.htpasswd, len(users)))
            except webjob.WebJobError as exc:
                users = {}
                write_stderr('%s: refusing every user until it can be read'
                             % exc)
            self.users, self.stamp = users, stamp
        return self.users

    @staticmethod
    def stamp_of(path):
        try:
            info = os.stat(path)
        except OSError:
            return None
        return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def check_password(self, user, password):
        """True when user's entry matches password.  An unknown user costs
        the same work as a known one (a known entry is checked and the
        answer discarded), so timing does not tell which users exist.

        :raises UnsupportedHashError: for an entry that cannot be checked.
        """
        users = self.passwords
        stored = users.get(user)
        if stored is not None:
            return check_htpasswd_password(stored, password)
        stand_in = next(iter(users.values())) if users else DUMMY_HASH
        try:
            check_htpasswd_password(stand_in, password)
        except UnsupportedHashError:
            pass
        return False


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


class StandaloneHandler(object):
    """One connection of the standalone server: HTTP/1.1 keep-alive, each
    request read by a RequestReader, authenticated, and answered through
    process_request; every request it saw anything of gets a log line."""

    def __init__(self, server, connection, address):
        self.server = server
        self.site = server.site
        self.auth = server.auth
        self.connection = connection
        self.address = address
        self.path = self.command = None     # the request's (serve_admin)
        self.reader = RequestReader(connection, server.idle_timeout)
        self.out = _SocketOut(connection)

    def handle(self):
        """Answer requests until the connection is to be closed."""
        while self.handle_one():
            pass

    def handle_one(self):
        """Read, answer and log one request; True to keep the connection."""
        try:
            data = self.reader.read_head()
            if not data:
                return False
            head = parse_head(data)
        except HeadError as exc:
            self.refuse(exc)
            return False
        self.path, self.command = head.target, head.method
        environ, length = self.build_environ(head)
        close = length is None or 'close' in head.connection_tokens() or (
            head.version == 'HTTP/1.0' and
            'keep-alive' not in head.connection_tokens())
        if self.server.admins and head.target.startswith(ADMIN_PATH):
            return self.serve_admin_pages(head, environ, length, close)
        fd = self.connection.fileno()
        stopping = self.server.connections.mark(fd, True)
        refused = self.authenticate(head, environ)
        body = _Body(self.reader, length or 0)
        if refused is None:
            if length and head.version == 'HTTP/1.1' and \
                    head.get('expect', '').lower() == '100-continue':
                self.out.write(b'HTTP/1.1 100 Continue\r\n\r\n')
            exchange = process_request(environ, body, self.site)
        else:
            exchange = refuse_unauthorized(environ, self.site, refused)
        close = close or body.remaining > 0   # the body's end is unknown
        close = close or stopping or self.server.connections.stopping
        extra = [('Date', http_date())]
        if close:
            extra.append(('Connection', 'close'))
        elif head.version == 'HTTP/1.0':
            extra.append(('Connection', 'keep-alive'))  # 1.0 asked for it
        self.connection.settimeout(self.server.idle_timeout)
        send_response(exchange, self.out, True, extra)
        log_exchange(exchange, self.site)
        self.server.connections.mark(fd, False)
        run_triggers(exchange)
        return not close

    def serve_admin_pages(self, head, environ, length, close):
        """Read-only report pages for an --admin user (serve_admin, in
        Reports below); any other user gets 401.  True to keep going."""
        refused = self.authenticate(head, environ)
        user = environ.get('REMOTE_USER')
        if refused is None and user not in self.server.admins:
            refused = 'user (%s) is not an administrator (--admin)' % (
                webjob.one_line(user or '-')[:64])
        exchange = Exchange(environ)
        exchange.site, exchange.filename = self.site, 'admin'
        if refused is None:
            status, headers, body, size = serve_admin(self, self.site)
            exchange.message = 'Administrator page (%s) for %s' % (
                webjob.one_line(head.target[:128]), user)
        else:
            status, body, size = 401, None, 0
            headers = [('WWW-Authenticate', 'Basic realm="WebJob"')]
            exchange.message = refused
        close = close or length is None or length > 0
        lines = ['HTTP/1.1 %d %s' % (status, STATUS_REASONS[status]),
                 'Date: %s' % http_date()] + [
            '%s: %s' % pair for pair in headers] + [
            'Content-Length: %d' % size]
        if close:
            lines.append('Connection: close')
        self.connection.settimeout(self.server.idle_timeout)
        try:
            self.out.write(('\r\n'.join(lines) + '\r\n\r\n').encode(
                'latin-1'))
            if body is not None and head.method != 'HEAD':
                exchange.server_length = copy_body(body, size, self.out)
        except OSError as exc:
            exchange.message += '; response not delivered: %s' % (
                exc.strerror or exc)
            close = True
        finally:
            if body is not None:
                body.close()
        exchange.status = status
        log_exchange(exchange, self.site)
        return not close

    def refuse(self, error):
        """Answer and log a head refused before the handler (HeadError)."""
        environ = {'REQUEST_METHOD': error.method,
                   'REMOTE_ADDR': self.address[0],
                   'SERVER_SOFTWARE': self.server.software}
        exchange = Exchange(environ)
        exchange.site = self.site
        exchange.status, exchange.message = error.status, error.message
        try:
            self.connection.settimeout(self.server.idle_timeout)
        except OSError:
            pass
        send_response(exchange, self.out, True, [('Date', http_date()),
                                                 ('Connection', 'close')])
        log_exchange(exchange, self.site)

    def build_environ(self, head):
        """The CGI variables process_request reads; (environ, length)
        with length None when the body's end is unknown."""
        path, _, query = head.target.partition('?')
        environ = {'REQUEST_METHOD': head.method, 'QUERY_STRING': query,
                   'SCRIPT_NAME': path, 'REMOTE_ADDR': self.address[0],
                   'SERVER_SOFTWARE': self.server.software,
                   'SERVER_PROTOCOL': head.version}
        lengths = head.get_all('content-length')
        for name in ('Job-Id', 'WebJob-Upload-Id') + UPLOAD_FIELDS:
            value = head.get(name.lower())
            if value is not None:
                environ['HTTP_' + name.upper().replace('-', '_')] = value
        length = 0
        if head.get('transfer-encoding') is not None or len(lengths) > 1:
            length = None               # unsupported framing: 454, then close
        elif lengths:
            environ['CONTENT_LENGTH'] = lengths[0]
            length = int(lengths[0]) if _is_ascii_digits(lengths[0]) else None
        return environ, length

    def authenticate(self, head, environ):
        """Set REMOTE_USER for an authenticated peer; return None, or why
        the request must be refused with 401.

        A client certificate (--client-ca) names the user by its subject
        CN; with --htpasswd too, the Basic user must be that same name.
        """
        auth = self.auth
        cert_user = None
        if auth.client_ca:
            cert_user = certificate_common_name(self.connection)
            if not cert_user:
                return 'client certificate has no single subject CN'
            environ['REMOTE_USER'] = cert_user
        if not auth.htpasswd:
            return None
        user, password = parse_basic_auth(head.get('authorization'))
        if user is None:
            return 'Basic credentials missing or malformed'
        try:
            ok = auth.check_password(user, password)
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


def http_date():
    """The Date field's value, now (RFC 9110 IMF-fixdate, C locale names)."""
    import time  # late import: start-up time
    now = time.gmtime()
    return '%s, %02d %s %d %02d:%02d:%02d GMT' % (
        ('Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun')[now.tm_wday],
        now.tm_mday, ('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug',
                      'Sep', 'Oct', 'Nov', 'Dec')[now.tm_mon - 1],
        now.tm_year, now.tm_hour, now.tm_min, now.tm_sec)


class StandaloneServer(object):
    """The standalone server: a listening socket, an accept loop, and a
    thread per connection running handler_class; TLS handshakes happen in
    that thread, time-limited, so a silent client never holds up accept.

    Built without a socket it still answers connections handed to
    handle_connection, which is how the tests drive it in process.
    """

    request_queue_size = LISTEN_BACKLOG   # INFO: a backlog of 5 lost uploads
    handler_class = StandaloneHandler
    idle_timeout = IDLE_TIMEOUT

    def __init__(self, site, auth=None, tls=None, admins=()):
        self.site = site
        self.auth = auth or Authentication()
        self.tls = tls
        self.admins = frozenset(admins)     # users of the ADMIN_PATH pages
        self.socket = None
        self.server_address = None
        self.stopping = False
        self.caught = []            # stop signals received (stop_on_signals)
        self.connections = Connections()
        self.software = 'nph_webjob.py/%s Python/%s' % (
            __version__, sys.version.split()[0])

    def listen(self, bind, port):
        """Bind and listen on (bind, port).

        :raises OSError: when the port cannot be had.
        """
        import socket  # late import: standalone only
        sock = socket.socket(socket.AF_INET6 if ':' in bind else
                             socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind, port))
            sock.listen(self.request_queue_size)
        except OSError:
            sock.close()
            raise
        self.socket = sock
        self.server_address = sock.getsockname()

    def serve_forever(self, poll_interval=0.5):
        """Accept connections until shutdown() (or a signal's exception)."""
        import select  # late import: standalone only
        while not self.stopping:
            if not select.select([self.socket], [], [], poll_interval)[0]:
                continue
            try:
                connection, address = self.socket.accept()
            except OSError:
                continue            # the peer went away before accept
            self.start_connection(connection, address)

    def start_connection(self, connection, address):
        """Answer one connection in a thread of its own."""
        import threading  # late import: standalone only
        thread = threading.Thread(target=self.handle_connection,
                                  args=(connection, address))
        thread.daemon = True
        thread.start()
        return thread

    def handle_connection(self, connection, address):
        """TLS handshake when configured, the handler, then close.  A failed
        handshake is one line on stderr (no request was seen); a connection
        that fails in a request is one log line; never a traceback."""
        import socket  # late import: standalone only
        fd = connection.fileno()
        self.connections.add(fd)
        try:
            try:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                      1)    # INFO: else ~40 ms per response
            except OSError:
                pass                        # not TCP (a test's socketpair)
            if self.tls is not None:
                connection.settimeout(self.idle_timeout)
                try:
                    connection = self.tls.wrap_socket(connection,
                                                      server_side=True)
                except OSError as exc:
                    write_stderr('%s: TLS handshake failed: %s: %s' % (
                        address[0], type(exc).__name__, exc))
                    return
            self.handler_class(self, connection, address).handle()
        except Exception as exc:
            log_connection_error(self.site, address[0], exc)
        finally:
            self.connections.remove(fd)
            try:
                connection.close()
            except OSError:
                pass

    def shutdown(self):
        """Make serve_forever return within its poll interval."""
        self.stopping = True

    def server_close(self):
        if self.socket is not None:
            self.socket.close()


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


def check_locker(base, init):
    """Refuse a BaseDirectory named by --root or a config that is not a
    locker yet, unless init: a mistyped path must not become a new, empty
    locker that clients then fill.  The default ./webjob-server is made
    without asking (the quick start).

    :raises webjob.WebJobError: naming the folder and the way out.
    """
    if init or base == os.path.abspath(DEFAULT_ROOT):
        return
    missing = [name for name in LAYOUT
               if not os.path.isdir(os.path.join(base, name))]
    if missing:
        raise webjob.WebJobError(
            'BaseDirectory %s: not a locker (no %s); check the path, or add '
            '--init to create one there' % (base, ', '.join(
                name + '/' for name in missing)))


def check_exposure(bind, force, tls_cert, tls_key, client_ca, auth,
                   admins=()):
    """Refuse option sets that do not go together, and a non-loopback
    address without TLS and authentication unless forced: evidence and
    credentials would cross the network in the clear or be open to anyone.

    :raises webjob.UsageError, webjob.WebJobError:
    """
    if bool(tls_cert) != bool(tls_key) or (client_ca and not tls_cert):
        raise webjob.UsageError('--tls-cert and --tls-key go together, and '
                                '--client-ca needs them')
    if admins and not auth.enabled:
        raise webjob.UsageError('--admin needs --htpasswd or --client-ca: '
                                'the report pages are for named users only')
    if not is_loopback(bind) and not force and not (tls_cert and auth.enabled):
        raise webjob.WebJobError('refusing to listen on %s without TLS and '
                                 'authentication (--tls-cert/--tls-key and '
                                 '--htpasswd or --client-ca); --force '
                                 'overrides' % bind)


def load_standalone_site(root, config, auth, init=False, server_id=None):
    """The Site: BaseDirectory is --root, else the config's, else
    ./webjob-server, its layout created if missing (for another folder than
    the default only with init: check_locker); RequireUser defaults to N
    without authentication and to Y with it; server_id (--server-id) wins
    over the config's ServerId, and job ids come from its serial file."""
    defaults = {'RequireUser': auth.enabled,
                'BaseDirectory': os.path.abspath(DEFAULT_ROOT)}
    overrides = {'BaseDirectory': os.path.abspath(root)} if root else {}
    if server_id is not None:
        overrides['ServerId'] = server_id
    try:
        site = load_site(config, True, defaults, overrides)
    except HTTPStatusError as exc:
        raise webjob.WebJobError(exc.message)
    check_locker(site.base, init)
    os.umask(0o022)
    try:
        make_layout(site.base)
    except OSError as exc:
        raise webjob.WebJobError('%s: %s' % (exc.filename, exc.strerror))
    site.next_serial = SerialCounter(os.path.join(
        site.logfiles, SERIAL_FILE % site.values['ServerId']))
    site.default_server_id = 'ServerId' not in site.values['_where'] and \
        'ServerId' not in overrides
    return site


def stop_on_signals(server):
    """SIGTERM and SIGINT ask run_server to stop the server, even before it
    runs; the handler only records the signal, so nothing is interrupted
    mid-step."""
    import signal  # late import: standalone only

    def stop(signum, frame):
        server.caught.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)   # INFO: even when started ignoring it


def listen_on(server, bind, port):
    """Bind the server's socket, or say why not."""
    try:
        server.listen(bind, port)
    except OSError as exc:
        raise webjob.WebJobError('cannot listen on %s port %d: %s'
                                 % (bind, port, exc.strerror or exc))


def run_server(server):
    """Serve until SIGTERM or SIGINT (stop_on_signals); one line when
    listening, one when stopped; return 0.

    The accept loop runs in a thread and the main thread waits for the
    signal (wait_for_signal); a stop closes idle connections at once and
    lets requests in flight finish for STOP_GRACE seconds (systemd's stop
    waits 90 s by default).
    """
    import threading  # late import: standalone only
    host, port = server.server_address[:2]
    site = server.site
    write_stderr('listening on %s://%s:%d/ (BaseDirectory %s, ServerId %s)'
                 % ('https' if server.tls else 'http',
                    '[%s]' % host if ':' in host else host, port, site.base,
                    site.values['ServerId']))
    if getattr(site, 'default_server_id', False):
        write_stderr('warning: ServerId is the default (%s): give each server '
                     'on a locker its own (--server-id)'
                     % site.values['ServerId'])
    loop = threading.Thread(target=server.serve_forever, args=(0.5,))
    loop.daemon = True
    loop.start()
    wait_for_signal(server.caught)
    write_stderr('stopping: no new connections; requests in flight get %d s'
                 % STOP_GRACE)
    server.shutdown()
    loop.join()
    server.server_close()
    cut = server.connections.stop(STOP_GRACE)
    write_stderr('stopped%s' % (' (%d requests cut at the end of the grace '
                                'time)' % cut if cut else ''))
    return 0


def serve(root=None, bind=DEFAULT_BIND, port=DEFAULT_PORT, config=None,
          tls_cert=None, tls_key=None, client_ca=None, htpasswd=None,
          force=False, admins=(), init=False, server_id=None):
    """Run the standalone server until SIGTERM or SIGINT; return 0.

    The steps: authentication, what may be exposed, TLS, the site and its
    locker, the server, its stop signals (before it listens, so a signal
    the moment a client can connect still stops it cleanly), listening.

    :raises webjob.WebJobError: for a refused bind, a bad config or a port
        that cannot be opened.
    """
    auth = Authentication(client_ca, htpasswd)
    check_exposure(bind, force, tls_cert, tls_key, client_ca, auth, admins)
    tls = build_tls_context(tls_cert, tls_key, client_ca) if tls_cert else None
    site = load_standalone_site(root, config, auth, init, server_id)
    raise_file_limit()
    server = StandaloneServer(site, auth, tls, admins)
    stop_on_signals(server)
    listen_on(server, bind, port)
    return run_server(server)


###############################################################################
# Locker tools: verify and list ###############################################
###############################################################################

#: What verify can find, one row per kind: (kind, the text it prints, True
#: when it makes verify exit 1).  A finding is (file or group name, kind,
#: detail); the text's %s takes the detail.
FINDINGS = (
    ('in_progress', 'upload in progress (a live process holds its lock)',
     False),
    ('incomplete', 'incomplete: %s', True),
    ('stale_lock', 'stale lock: no live process holds it (an upload that '
     'was killed)', True),
    ('orphan_temporary', 'orphan temporary file of an upload that was '
     'killed', True),
    ('stray', 'not part of any group (planted or left behind)', True),
    ('not_a_file', 'not a regular file (%s)', True),
    ('unreadable', 'unreadable: %s', True),
    ('flagged', 'flagged at upload: %s', True),
    ('hash_mismatch', 'does not match %s in .env', True),
    ('not_in_manifest', 'not in the manifest', True),
    ('changed', 'changed since upload (SHA-256 differs from the manifest)',
     True),
    ('missing', 'missing since upload (in the manifest)', True),
    ('duplicate_job_id', 'job id %s repeats that of %s', True),
    ('malformed_manifest', 'malformed line [%s]', True),
    ('partial', 'partial upload, not a group: %s', True),
)
FINDING_TEXT = dict((kind, text) for kind, text, problem in FINDINGS)
PROBLEM_KINDS = frozenset(kind for kind, text, problem in FINDINGS if problem)
LOCK_EXTENSION = 'lck'

GROUP_NAME = (r'(?P<client>.+?)_(?P<stamp>\d{14})_(?P<serial>\d{5})_'
              r'(?P<program>.+)\Z')


def describe_file_type(mode):
    """'directory', 'symbolic link', ... for a non-regular lstat mode."""
    import stat  # late import: tools only
    for test, name in ((stat.S_ISDIR, 'directory'),
                       (stat.S_ISLNK, 'symbolic link'),
                       (stat.S_ISFIFO, 'FIFO'), (stat.S_ISSOCK, 'socket'),
                       (stat.S_ISCHR, 'character device'),
                       (stat.S_ISBLK, 'block device')):
        if test(mode):
            return name
    return 'unknown type'


def scan_incoming(incoming):
    """Sort every entry of incoming/ into groups and the rest.

    Returns (groups, temporaries, findings): groups {group: {ext: lstat}}
    of the regular files named <group>.<ext> (ext a group extension or
    lck), temporaries {group: [name]} of the '.<group>.<ext>' files an
    upload writes first, and a finding for every other entry.  Nothing is
    followed: a link or folder named like a group file is a finding.

    :raises OSError: when incoming/ cannot be listed.
    """
    import re  # late import: tools only
    import stat  # late import: tools only
    names = sorted(os.listdir(incoming))
    groups, temporaries, findings = {}, {}, []
    extensions = GROUP_EXTENSIONS + (LOCK_EXTENSION,)
    for name in names:
        if name == PARTIAL_FOLDER:
            continue                # INFO: partial_findings looks inside
        try:
            info = os.lstat(os.path.join(incoming, name))
        except OSError:
            continue                # INFO: gone since the listing
        stem, dot, ext = name[name.startswith('.'):].rpartition('.')
        named = bool(dot) and ext in extensions and \
            re.match(GROUP_NAME, stem) is not None
        if not stat.S_ISREG(info.st_mode):
            findings.append((name, 'not_a_file',
                             describe_file_type(info.st_mode)))
        elif not named or (name.startswith('.') and ext == LOCK_EXTENSION):
            findings.append((name, 'stray', ''))
        elif name.startswith('.'):
            temporaries.setdefault(stem, []).append(name)
        else:
            groups.setdefault(stem, {})[ext] = info
    return groups, temporaries, findings


def read_groups(incoming):
    """{group: set of extensions} of the regular files named like group
    files (see scan_incoming).

    :raises OSError: when incoming/ cannot be listed.
    """
    return dict((group, set(exts)) for group, exts in
                scan_incoming(incoming)[0].items())


def list_incoming(incoming):
    """scan_incoming for the tools: a folder that cannot be listed is one
    clear error."""
    try:
        return scan_incoming(incoming)
    except OSError as exc:
        raise webjob.WebJobError('%s: %s' % (incoming, exc.strerror or exc))


def lock_is_held(path):
    """True when a live process holds the flock of an upload's .lck (its
    store_upload); False for a lock a killed upload left."""
    import errno  # late import: tools only
    import fcntl  # late import: tools only
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)            # INFO: releases a lock taken just now


def read_manifest(path):
    """{file name: SHA-256 hex} from the manifest; a missing one is empty.
    Malformed lines are returned apart, as (number, text)."""
    recorded, malformed = {}, []
    try:
        handle = open(path, 'rb')
    except OSError as exc:
        if not os.path.lexists(path):
            return recorded, malformed
        raise webjob.WebJobError('%s: %s' % (path, exc.strerror or exc))
    try:
        with handle:
            for number, line in enumerate(handle, 1):
                digest, sep, name = line.rstrip(b'\n').decode(
                    'utf-8', 'surrogateescape').partition('  ')
                if sep and len(digest) == 64 and set(digest) <= HEX_DIGITS \
                        and name and '/' not in name:
                    recorded[name] = digest.lower()
                else:
                    malformed.append((number, webjob.one_line(line[:80])))
    except OSError as exc:
        raise webjob.WebJobError('%s: %s' % (path, exc.strerror or exc))
    return recorded, malformed


def check_group_lock(incoming, group, exts, findings):
    """'held', 'stale' or None (no lock) for a group's .lck; a stale one is
    a finding."""
    if LOCK_EXTENSION not in exts:
        return None
    name = '%s.%s' % (group, LOCK_EXTENSION)
    try:
        held = lock_is_held(os.path.join(incoming, name))
    except OSError as exc:
        findings.append((name, 'unreadable', exc.strerror or str(exc)))
        return None
    if not held:
        findings.append((name, 'stale_lock', ''))
    return 'held' if held else 'stale'


def verify_group(incoming, group, exts, recorded):
    """The findings of one group that is not in progress: incomplete,
    flagged at upload, streams that do not match the .env's hashes, files
    changed since upload or never recorded."""
    findings = []
    sealed = 'rdy' in exts
    if not sealed:
        findings.append((group, 'incomplete', 'no .rdy'))
    for ext in STREAM_EXTENSIONS:
        name = group + '.' + ext
        if sealed and ext not in exts and name not in recorded:
            findings.append((group, 'incomplete', 'no .' + ext))
    path = os.path.join(incoming, group + '.')
    try:
        if 'bad' in exts:
            result = read_key_values(path + 'bad').get('Result', 'mismatch')
            findings.append((group + '.bad', 'flagged', result))
        declared = read_declared_hashes(path + 'env') if 'env' in exts else \
            (None, None, None)
    except OSError as exc:
        findings.append((group, 'unreadable', exc.strerror or str(exc)))
        declared = (None, None, None)
    for ext in sorted(set(exts) - {LOCK_EXTENSION}):
        name = group + '.' + ext
        want = {'out': declared[1], 'err': declared[2]}.get(ext)
        names = ['SHA256'] + ([declared[0]] if want and declared[0] !=
                              'SHA256' else [])
        try:
            sums = hash_file(path + ext, names)
        except OSError as exc:
            findings.append((name, 'unreadable', exc.strerror or str(exc)))
            continue
        if want and sums[declared[0]] != want:
            findings.append((name, 'hash_mismatch', '%s (%s)' % (
                'StdOutHash' if ext == 'out' else 'StdErrHash', declared[0])))
        if name not in recorded:
            if sealed:
                findings.append((name, 'not_in_manifest', ''))
        elif recorded[name] != sums['SHA256']:
            findings.append((name, 'changed', ''))
    return findings


def read_job_id(path):
    """The Jid of a .rdy, or None."""
    try:
        value = read_key_values(path, 512).get('Jid')
    except OSError:
        return None
    return value if value and is_job_id(value) else None


def inspect_locker(base):
    """Every finding about base's incoming/ and manifest, in name order,
    and the summary counts (groups, manifest files).  verify prints them;
    other tools may format them otherwise."""
    incoming = os.path.join(base, 'incoming')
    groups, temporaries, findings = list_incoming(incoming)
    recorded, malformed = read_manifest(os.path.join(base, 'logfiles',
                                                     MANIFEST_NAME))
    findings.extend(('%s:%d' % (MANIFEST_NAME, n), 'malformed_manifest',
                     text) for n, text in malformed)
    present = set(name for name, kind, detail in findings
                  if kind == 'not_a_file')
    job_ids = {}
    for group in sorted(set(groups) | set(temporaries)):
        exts = groups.get(group, {})
        present.update(group + '.' + ext for ext in exts)
        lock = check_group_lock(incoming, group, exts, findings)
        if lock == 'held' and 'rdy' not in exts:
            findings.append((group, 'in_progress', ''))
            continue
        findings.extend((name, 'orphan_temporary', '')
                        for name in temporaries.get(group, ()))
        if not exts or set(exts) == {LOCK_EXTENSION}:
            continue                # INFO: the lock is reported already
        findings.extend(verify_group(incoming, group, exts, recorded))
        job_id = read_job_id(os.path.join(incoming, group + '.rdy')) \
            if 'rdy' in exts else None
        if job_id in job_ids:
            findings.append((group, 'duplicate_job_id', (job_id,
                                                         job_ids[job_id])))
        elif job_id:
            job_ids[job_id] = group
    findings.extend((name, 'missing', '')
                    for name in sorted(set(recorded) - present))
    findings.extend(partial_findings(incoming))
    return findings, len(groups), len(recorded)


def describe_finding(kind, detail):
    """What a finding of kind means, its detail filled in."""
    text = FINDING_TEXT[kind]
    return text % detail if '%s' in text else text


def format_finding(name, kind, detail):
    """'<name>: <what>' as verify prints it."""
    return '%s: %s' % (webjob.one_line(name), describe_finding(kind, detail))


def verify_locker(base, out, as_json=False):
    """Check every file of base/incoming and the manifest; print one line
    (or JSON object) per finding and a summary.  Returns the number of
    problems."""
    findings, groups, recorded = inspect_locker(base)
    problems = sum(1 for name, kind, detail in findings
                   if kind in PROBLEM_KINDS)
    busy = len(findings) - problems
    if as_json:
        write_json_lines(out, [{
            'kind': 'problem' if kind in PROBLEM_KINDS else 'notice',
            'name': name, 'problem': describe_finding(kind, detail)}
            for name, kind, detail in findings] + [{
                'kind': 'summary', 'groups': groups,
                'manifest_files': recorded, 'problems': problems}])
        return problems
    for finding in findings:
        out.write(format_finding(*finding) + '\n')
    out.write('verify: %d groups, %d files in the manifest, %d problems%s\n'
              % (groups, recorded, problems, ', %d uploads in progress' % busy
                 if busy else ''))
    return problems


def write_json_lines(out, records):
    """--json: one object per line, keys sorted, for a SIEM or a notebook."""
    import json  # late import: tools only
    for record in records:
        out.write(json.dumps(record, sort_keys=True) + '\n')


LIST_KEYS = ('kind', 'date', 'group', 'client', 'program', 'jid',
             'kid_status', 'out_size', 'err_size', 'env_size')


def list_jobs(base, out, client=None, since=None, as_json=False):
    """One line (or JSON object) per group, oldest first: Date Time
    ClientId Program JobId KidStatus OutSize ErrSize EnvSize ('-' when
    unknown; KidStatus NA when the program never ran)."""
    import re  # late import: tools only
    incoming = os.path.join(base, 'incoming')
    groups = list_incoming(incoming)[0]
    rows = []
    for group, exts in groups.items():
        match = re.match(GROUP_NAME, group)
        if (client and match.group('client') != client) or \
                (since and match.group('stamp') < since):
            continue
        rows.append((match.group('stamp'), match.group('serial'), group,
                     match, exts))
    for stamp, serial, group, match, exts in sorted(rows):
        path = os.path.join(incoming, group + '.')
        env = read_optional_values(path + 'env') if 'env' in exts else {}
        rdy = read_optional_values(path + 'rdy') if 'rdy' in exts else {}
        status = env.get('KidStatus', '')
        sizes = [exts[ext].st_size if ext in exts else None
                 for ext in STREAM_EXTENSIONS]
        fields = [match.group('client'), match.group('program'),
                  rdy.get('Jid') or env.get('Jid'), status] + sizes
        when = '%s-%s-%s %s:%s:%s' % (stamp[:4], stamp[4:6], stamp[6:8],
                                      stamp[8:10], stamp[10:12], stamp[12:])
        if as_json:
            write_json_lines(out, [dict(zip(LIST_KEYS, [
                'group', when, group] + [f or None for f in fields[:4]] +
                sizes))])
            continue
        out.write('%s %s\n' % (when, ' '.join(log_field(f) for f in fields)))
    return len(rows)


def read_optional_values(path):
    """read_key_values, or {} for a file that cannot be read now."""
    try:
        return read_key_values(path)
    except OSError:
        return {}


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
# Hunts #######################################################################
###############################################################################

# INFO: a hunt is one job queued for many clients at once: jobqueues/.hunts/
# <name>.hunt holds its job and limits, <name>.clients names each client's
# entry ('<ClientId> <NNNNNN>' lines), <name>.handouts counts hand-outs for
# its Rate.  Progress is read from the entries themselves, so it can never
# disagree with what the queues hand out.

#: Progress of one client, from its entry's state (queued splits by whether
#: the client has asked since: pending, or never seen).
PROGRESS = ('done', 'failed', 'running', 'pending', 'never-seen', 'expired',
            'cancelled')
DURATION_UNITS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}


def parse_expiry(text, now):
    """--expires: a duration ('90m', '2h', '3d', '3600s') from now, or a
    local 'YYYY-MM-DD[ HH:MM[:SS]]'; the epoch it names.

    :raises webjob.UsageError: for anything else, or a time in the past.
    """
    import time  # late import: tools only
    unit = DURATION_UNITS.get(text[-1:])
    if unit and _is_ascii_digits(text[:-1]):
        return int(now) + int(text[:-1]) * unit
    try:
        stamp = parse_since(text)
    except webjob.UsageError:
        raise webjob.UsageError('--expires: expected a duration (90m, 2h, '
                                '3d) or YYYY-MM-DD[ HH:MM[:SS]], got [%s]'
                                % webjob.one_line(text[:40]))
    epoch = int(time.mktime(time.strptime(stamp, '%Y%m%d%H%M%S')))
    if epoch <= now:
        raise webjob.UsageError('--expires: [%s] is in the past' %
                                webjob.one_line(text[:40]))
    return epoch


def known_clients(base):
    """Every client the server knows: a profile, a queue, or an upload."""
    import re  # late import: tools only
    found = set()
    for folder in (os.path.join(base, 'profiles'),
                   os.path.join(base, QUEUE_FOLDER)):
        try:
            found.update(name for name in os.listdir(folder)
                         if webjob.is_client_id(name) and
                         os.path.isdir(os.path.join(folder, name)))
        except OSError:
            pass
    found.discard(COMMON_PROFILE)
    try:
        for group in read_groups(os.path.join(base, 'incoming')):
            match = re.match(GROUP_NAME, group)
            if match and webjob.is_client_id(match.group('client')):
                found.add(match.group('client'))
    except OSError:
        pass
    return found


def read_group_file(path):
    """Client ids from a group file: one a line, '#' comments, blanks.

    :raises webjob.UsageError: naming the file and line of a bad id.
    """
    try:
        with open(path, 'rb') as handle:
            data = handle.read(webjob.MAX_CONFIG_SIZE)
    except OSError as exc:
        raise webjob.UsageError('--group: %s: %s' % (path, exc.strerror))
    clients = []
    for number, line in enumerate(data.decode('utf-8', 'replace')
                                  .splitlines(), 1):
        name = line.split('#', 1)[0].strip()
        if not name:
            continue
        if not webjob.is_client_id(name):
            raise webjob.UsageError('--group: %s:%d: [%s] is not a client id'
                                    % (path, number,
                                       webjob.one_line(name[:64])))
        clients.append(name)
    return clients


def select_clients(base, options):
    """The hunt's or job's clients, sorted and once each, from --client /
    --clients, --pattern (over known_clients) and --group."""
    import fnmatch  # late import: tools only
    chosen = set()
    for name in (options.clients or '').split(','):
        if name:
            if not webjob.is_client_id(name):
                raise webjob.UsageError('--clients: [%s] is not a client id'
                                        % webjob.one_line(name[:64]))
            chosen.add(name)
    if getattr(options, 'pattern', None):
        matched = fnmatch.filter(sorted(known_clients(base)), options.pattern)
        if not matched:
            raise webjob.UsageError('--pattern: [%s] matches no known client '
                                    '(profiles/, jobqueues/, incoming/)'
                                    % webjob.one_line(options.pattern[:64]))
        chosen.update(matched)
    if getattr(options, 'group', None):
        chosen.update(read_group_file(options.group))
    if not chosen:
        raise webjob.UsageError('no client: give --clients, --pattern or '
                                '--group')
    return sorted(chosen)


def job_fields(base, options, client_id):
    """The entry keys of the job described by the options, for one client;
    --pin takes the SHA-256 of the program this client would be served.

    :raises webjob.UsageError: for a bad name, hash or pin.
    """
    if not webjob.is_program_name(options.command):
        raise webjob.UsageError('--command: [%s] is not a plain program name'
                                % webjob.one_line(options.command[:64]))
    alias = options.alias or options.command
    if not webjob.is_program_name(alias):
        raise webjob.UsageError('--alias: [%s] is not a plain program name'
                                % webjob.one_line(alias[:64]))
    fields = {'Command': options.command, 'CommandAlias': alias,
              'CommandLine': ' '.join([alias] + (options.args or '').split()),
              'Comment': webjob.one_line(options.comment or ''),
              'Priority': '%d' % options.priority}
    for key, name, size in PIN_KEYS:
        value = getattr(options, name.lower())
        if value is not None:
            if len(value) != size or not set(value) <= HEX_DIGITS:
                raise webjob.UsageError('--%s: expected %d hex digits'
                                        % (name.lower(), size))
            fields[key] = value.lower()
    if options.pin:
        if alias != options.command:
            raise webjob.UsageError('--pin: the client downloads %s, not the '
                                    'stored %s; give --sha256' % (
                                        alias, options.command))
        path = stored_program(base, client_id, options.command)
        if path is None:
            raise webjob.UsageError('--pin: no profiles/%s/commands/%s nor '
                                    'profiles/common/commands/%s' % (
                                        client_id, options.command,
                                        options.command))
        fields['CommandSha256'] = hash_file(path, ['SHA256'])['SHA256']
    if options.expires is not None:
        fields['Expires'] = '%d' % options.expires
    return fields


def stored_program(base, client_id, name):
    """The file a GET of name by this client is served, or None."""
    for folder in (client_id, COMMON_PROFILE):
        path = os.path.join(base, 'profiles', folder, 'commands', name)
        if os.path.isfile(path):
            return path
    return None


def queue_jobs(base, options, clients, now, hunt=None):
    """One entry per client; returns their names."""
    made = []
    for client_id in clients:
        fields = job_fields(base, options, client_id)
        if hunt:
            fields['Hunt'] = hunt
        made.append(add_entries(base, client_id, fields, now))
    return made


def start_hunt(base, options, out, now):
    """hunt start: the hunt record, then one entry per client; 0."""
    name = options.name
    if not webjob.is_client_id(name):
        raise webjob.UsageError('hunt: [%s] is not a valid hunt name (letters,'
                                ' digits, "_", "-", ".")' %
                                webjob.one_line(name[:64]))
    clients = select_clients(base, options)
    for client_id in clients[:1]:
        job_fields(base, options, client_id)    # INFO: refuse before writing
    folder = hunt_folder(base)
    if not os.path.isdir(os.path.dirname(folder)):
        os.makedirs(os.path.dirname(folder), 0o755)
    if not os.path.isdir(folder):
        make_queue_folder(folder)
    record = os.path.join(folder, name + '.hunt')
    with FolderLock(folder):
        if os.path.exists(record):
            raise webjob.WebJobError('hunt %s exists already (%s)' % (
                name, record))
        fields = dict(job_fields(base, options, clients[0]), Name=name,
                      Rate='%d' % options.rate, Created='%d' % now,
                      Clients='%d' % len(clients))
        if options.pin:         # INFO: each client's own, in its entry
            del fields['CommandSha256']
        webjob.replace_file(record, format_entry(fields))
    made = queue_jobs(base, options, clients, now, hunt=name)
    webjob.replace_file(os.path.join(folder, name + '.clients'), ''.join(
        '%s %s\n' % tuple(entry.split('/')) for entry in made).encode('ascii'))
    out.write('hunt %s: %s queued for %d clients%s%s\n' % (
        name, fields['CommandLine'], len(clients),
        ', at most %d per minute' % options.rate if options.rate else '',
        ', expires %s' % format_epoch_local(options.expires)
        if options.expires else ''))
    return 0


def format_epoch_local(epoch):
    import time  # late import: tools only
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(int(epoch)))


def entry_view(entry, now, hand_out_limit):
    """A copy of an entry settled by the clock (nothing is written)."""
    view = dict(entry)
    settle_entry(view, now, hand_out_limit)
    return view


def progress_of(view):
    """One of PROGRESS for a settled entry."""
    state = view.get('State')
    if state == 'handed-out':
        return 'running'
    if state == 'queued':
        return 'pending' if view.get('Asked') else 'never-seen'
    return state if state in PROGRESS else 'failed'


def hunt_rows(base, name, now, hand_out_limit):
    """[(client, entry view)] of a hunt, in its .clients order.

    :raises webjob.WebJobError: when the hunt does not exist.
    """
    path = os.path.join(hunt_folder(base), name + '.clients')
    if not webjob.is_client_id(name) or not os.path.isfile(path):
        raise webjob.WebJobError('hunt %s: no such hunt (%s)' % (
            webjob.one_line(name[:64]), path))
    rows = []
    with open(path, 'rb') as handle:
        for line in handle:
            client_id, _, number = line.decode('ascii', 'replace').strip() \
                .partition(' ')
            if not (webjob.is_client_id(client_id) and
                    webjob.is_digits(number)):
                continue
            entry_path = os.path.join(queue_folder(base, client_id),
                                      number + ENTRY_EXTENSION)
            entry = read_key_values(entry_path) if os.path.isfile(
                entry_path) else {'State': 'failed',
                                  'Why': 'queue entry missing'}
            entry.update(Entry=number, ClientId=client_id)
            rows.append((client_id, entry_view(entry, now, hand_out_limit)))
    return rows


def hunt_names(base):
    try:
        names = os.listdir(hunt_folder(base))
    except OSError:
        return []
    return sorted(name[:-len('.hunt')] for name in names
                  if name.endswith('.hunt') and not name.startswith('.'))


def hunt_progress(base, name, now, hand_out_limit):
    """(hunt record, rows, totals) where rows are (client, progress, entry
    view) and totals count each PROGRESS value."""
    rows = [(client, progress_of(view), view) for client, view
            in hunt_rows(base, name, now, hand_out_limit)]
    record = read_key_values(os.path.join(hunt_folder(base), name + '.hunt'))
    totals = dict((key, 0) for key in PROGRESS)
    for client, progress, view in rows:
        totals[progress] += 1
    return record, rows, totals


def show_hunt(base, name, out, as_json, now, hand_out_limit):
    """hunt status: a line (or JSON object) per client, then the totals;
    0 when every client is done, 1 otherwise."""
    record, rows, totals = hunt_progress(base, name, now, hand_out_limit)
    for client, progress, view in rows:
        if as_json:
            write_json_lines(out, [{
                'kind': 'hunt-client', 'hunt': name, 'client': client,
                'progress': progress, 'entry': entry_name(view),
                'result': view.get('Result') or None,
                'why': view.get('Why') or None}])
        else:
            why = view.get('Why', '') if progress in (
                'failed', 'expired', 'cancelled') else ''
            out.write('%s %s %s %s%s\n' % (
                client, log_field(progress), entry_name(view),
                log_field(view.get('Result')),
                ' -- ' + webjob.one_line(why) if why else ''))
    if as_json:
        write_json_lines(out, [dict(totals, kind='hunt', hunt=name,
                                    clients=len(rows),
                                    command=record.get('CommandLine'))])
    else:
        out.write('hunt %s: %d clients: %s\n' % (name, len(rows), ', '.join(
            '%d %s' % (totals[key], key) for key in PROGRESS)))
    return 0 if totals['done'] == len(rows) else 1


def list_queue(base, out, client, as_json, now, hand_out_limit):
    """job list: one line (or JSON object) per queue entry."""
    clients = [client] if client else sorted(
        name for name in os.listdir(os.path.join(base, QUEUE_FOLDER))
        if webjob.is_client_id(name)) if os.path.isdir(
            os.path.join(base, QUEUE_FOLDER)) else []
    count = 0
    for client_id in clients:
        for entry in read_entries(queue_folder(base, client_id)):
            entry['ClientId'] = client_id
            view = entry_view(entry, now, hand_out_limit)
            count += 1
            if as_json:
                record = dict((key, view[key]) for key in ENTRY_KEYS
                              if key in view)
                record.update(kind='job', name=entry_name(view))
                write_json_lines(out, [record])
                continue
            out.write('%s %s\n' % (entry_name(view), ' '.join(log_field(
                view.get(key)) for key in ('State', 'CommandLine', 'Hunt',
                                           'HandOuts', 'Result', 'Why'))))
    return count


def cancel_entries(base, names, out, now):
    """job cancel: cancel open entries named client/NNNNNN; 1 when one of
    them was not open or does not exist."""
    failed = 0
    for name in names:
        client_id, slash, number = name.partition('/')
        if not (slash and webjob.is_client_id(client_id) and
                webjob.is_digits(number) and len(number) == ENTRY_DIGITS):
            raise webjob.UsageError('job cancel: [%s]: expected CLIENT/NNNNNN'
                                    % webjob.one_line(name[:80]))
        folder = queue_folder(base, client_id)
        path = os.path.join(folder, number + ENTRY_EXTENSION)
        if not os.path.isfile(path):
            out.write('%s: no such entry\n' % name)
            failed += 1
            continue
        with FolderLock(folder):
            entry = read_key_values(path)
            entry['Entry'] = number
            if entry.get('State') not in OPEN_STATES:
                out.write('%s: not cancelled: already %s\n' % (
                    name, entry.get('State')))
                failed += 1
                continue
            entry.update(State='cancelled', Finished='%d' % now,
                         Why='cancelled by the administrator')
            save_entry(folder, entry)
        out.write('%s: cancelled\n' % name)
    return 1 if failed else 0


def cancel_hunt(base, name, out, now):
    """hunt cancel: cancel every open entry of the hunt."""
    names = [entry_name(view) for client, view in
             hunt_rows(base, name, now, 0) if view.get('State') in OPEN_STATES]
    if not names:
        out.write('hunt %s: nothing open to cancel\n' % name)
        return 0
    return cancel_entries(base, names, out, now)


###############################################################################
# Reports #####################################################################
###############################################################################

# INFO: report reads incoming/, the manifest, nph-webjob.log and the queues,
# and writes nothing but its output (and --html FILE, whole or not at all).
# It shows what list does not: every failed job and why, GETs that never
# came back as a PUT, each client's last contact.

LOG_FIELDS = ('date', 'time', 'jid', 'user', 'address', 'method', 'client',
              'filename', 'length', 'server_length', 'duration', 'status')


def parse_log_line(line):
    """{field: value} of one nph-webjob.log line ('-' becomes ''), with
    'message'; None for a line that is not in the format."""
    head, sep, message = line.rstrip('\n').partition(' --')
    parts = head.split(' ')
    if not sep or len(parts) != len(LOG_FIELDS):
        return None
    record = dict((key, '' if value == '-' else value)
                  for key, value in zip(LOG_FIELDS, parts))
    record['message'] = message[1:] if message.startswith(' ') else message
    return record


def read_log(base):
    """The parsed lines of logfiles/nph-webjob.log, oldest first."""
    path = os.path.join(base, 'logfiles', LOG_NAME)
    try:
        handle = open(path, 'rb')
    except OSError:
        return []
    with handle:
        return [record for record in (
            parse_log_line(line.decode('utf-8', 'replace'))
            for line in handle) if record is not None]


def veto_kind(why):
    """'dsv-veto', 'gethook-veto', 'hash-mismatch' or 'failed', by the
    words the client and server use."""
    text = ' '.join(why)
    if 'DSV' in text:
        return 'dsv-veto'
    if 'GetHook' in text:
        return 'gethook-veto'
    if 'hash mismatch' in text or 'differs from the pinned' in text:
        return 'hash-mismatch'
    return 'failed'


def collect_jobs(base, client=None, since=None):
    """One dict per incoming group, oldest first: who, what, exit status,
    result (ok / failed) and why, the server's hash verification."""
    import re  # late import: tools only
    incoming = os.path.join(base, 'incoming')
    try:
        groups = read_groups(incoming)
    except OSError as exc:
        raise webjob.WebJobError('%s: %s' % (incoming, exc.strerror or exc))
    recorded = read_manifest(os.path.join(base, 'logfiles', MANIFEST_NAME))[0]
    jobs = []
    for group, exts in groups.items():
        match = re.match(GROUP_NAME, group)
        if not match or (client and match.group('client') != client) or \
                (since and match.group('stamp') < since):
            continue
        path = os.path.join(incoming, group + '.')
        env = read_key_values(path + 'env') if 'env' in exts else {}
        rdy = read_key_values(path + 'rdy') if 'rdy' in exts else {}
        why = judge_upload(env, 'bad' in exts)
        if 'rdy' not in exts:
            why.append('incomplete: no .rdy')
        declared = read_declared_hashes(path + 'env') if 'env' in exts \
            else (None, None, None)
        if 'bad' in exts:
            hashes = 'mismatch'
        elif declared[0] and (declared[1] or declared[2]) and \
                group + '.out' in recorded:
            hashes = 'match:%s' % declared[0]
        else:
            hashes = 'unchecked'
        stamp = match.group('stamp')
        jobs.append({
            'kind': 'job', 'group': group, 'client': match.group('client'),
            'program': match.group('program'),
            'date': '%s-%s-%s %s:%s:%s' % (stamp[:4], stamp[4:6], stamp[6:8],
                                           stamp[8:10], stamp[10:12],
                                           stamp[12:]),
            'jid': rdy.get('Jid') or env.get('Jid') or None,
            'kid_status': env.get('KidStatus') or None,
            'get_error': env.get('GetError') or None,
            'run_error': env.get('RunError') or None,
            'result': veto_kind(why) if why else 'ok', 'why': why,
            'hashes': hashes, 'files': sorted(exts - {'lck'}),
            '_order': (stamp, match.group('serial'))})
    jobs.sort(key=lambda job: job['_order'])
    for job in jobs:
        del job['_order']
    return jobs


def collect_log_findings(records, client=None):
    """(failures, last contact per client) from the log: GETs refused or
    never followed by a PUT with their Job-Id."""
    put_ids = set(r['jid'] for r in records if r['method'] == 'PUT' and
                  r['jid'])
    failures, contact = [], {}
    for record in records:
        who = record['client']
        if not who or (client and who != client):
            continue
        contact[who] = record
        if record['method'] != 'GET':
            continue
        if record['status'] == '200' and record['jid'] not in put_ids:
            why = ['GET without a PUT']
        elif record['status'] not in ('200', ''):
            why = ['GET refused: %s %s' % (record['status'],
                                          record['message'])]
        else:
            continue
        failures.append({
            'kind': 'failure', 'date': '%s %s' % (record['date'],
                                                  record['time']),
            'client': who, 'program': record['filename'] or None,
            'jid': record['jid'] or None, 'why': why,
            'result': veto_kind(why) if 'GetHook' in record['message']
            else 'failed', 'source': 'log'})
    return failures, contact


def build_report(base, client=None, since=None):
    """Everything the report shows: jobs, failures (jobs and log), clients
    (last contact), hunts (progress)."""
    import time  # late import: tools only
    jobs = collect_jobs(base, client, since)
    records = read_log(base)
    if since:
        records = [r for r in records if (r['date'] + r['time']).replace(
            '-', '').replace(':', '') >= since]
    log_failures, contact = collect_log_findings(records, client)
    failures = [dict(job, kind='failure', source='upload') for job in jobs
                if job['result'] != 'ok'] + log_failures
    failures.sort(key=lambda item: item['date'])
    names = set(contact) | set(job['client'] for job in jobs)
    if not client:
        names |= known_clients(base)
    elif webjob.is_client_id(client):
        names.add(client)
    clients = []
    for name in sorted(names):
        last = contact.get(name)
        mine = [job for job in jobs if job['client'] == name]
        clients.append({
            'kind': 'client', 'client': name,
            'last_contact': '%s %s' % (last['date'], last['time'])
            if last else None,
            'last_request': '%s %s %s' % (last['method'], last['filename'],
                                          last['status']) if last else None,
            'jobs': len(mine),
            'failed': sum(1 for job in mine if job['result'] != 'ok')})
    now = time.time()
    hunts = []
    for name in hunt_names(base):
        try:
            record, rows, totals = hunt_progress(base, name, now, 0)
        except webjob.WebJobError:
            continue
        hunts.append({'kind': 'hunt', 'hunt': name,
                      'command': record.get('CommandLine'),
                      'clients': len(rows), 'totals': totals,
                      'rows': [{'client': c, 'progress': p,
                                'entry': entry_name(v),
                                'result': v.get('Result') or None,
                                'why': v.get('Why') or None}
                               for c, p, v in rows]})
    return {'jobs': jobs, 'failures': failures, 'clients': clients,
            'hunts': hunts}


def write_report(report, out, as_json):
    """The report as text lines, or JSON lines (one object each)."""
    items = report['failures'] + report['clients'] + report['jobs']
    if as_json:
        write_json_lines(out, [dict((k, v) for k, v in item.items()
                                    if v is not None) for item in items + [
            dict(hunt, rows=None) for hunt in report['hunts']]])
    else:
        for item in report['failures']:
            out.write('failure %s %s %s %s %s -- %s\n' % (
                item['date'], log_field(item['client']),
                log_field(item['program']), log_field(item['jid']),
                log_field(item['result']), '; '.join(item['why'])))
        for item in report['clients']:
            out.write('client %s jobs=%d failed=%d last-contact %s\n' % (
                log_field(item['client']), item['jobs'], item['failed'],
                '%(last_contact)s %(last_request)s' % item
                if item['last_contact'] else 'never'))
        for item in report['jobs']:
            out.write('job %s %s %s %s %s %s %s\n' % (
                item['date'], log_field(item['client']),
                log_field(item['program']), log_field(item['jid']),
                log_field(item['kid_status']), log_field(item['result']),
                log_field(item['hashes'])))
        for hunt in report['hunts']:
            out.write('hunt %s %d clients: %s\n' % (
                hunt['hunt'], hunt['clients'], ', '.join(
                    '%d %s' % (hunt['totals'][key], key) for key in PROGRESS)))
    summary = {'kind': 'summary', 'jobs': len(report['jobs']),
               'failures': len(report['failures']),
               'clients': len(report['clients']),
               'hunts': len(report['hunts'])}
    if as_json:
        write_json_lines(out, [summary])
    else:
        out.write('report: %(jobs)d jobs, %(failures)d failures, %(clients)d '
                  'clients, %(hunts)d hunts\n' % summary)
    return len(report['failures'])


#: The report as HTML: one self-contained page (style inline, no script,
#: no request for anything else), the same for report --html and the
#: standalone server's administrator pages.  Uploads are shown as escaped
#: text only; controls, ANSI escapes and bidi overrides become visible \\x..
HTML_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; "
               "img-src data:; form-action 'none'; base-uri 'none'")
PREVIEW_LIMIT = 1 << 16         # bytes of each .out/.err shown in the page
EMBED_LIMIT = 1 << 18           # a static report embeds files up to this
ADMIN_PATH = '/webjob-admin/'   # the standalone server's read-only pages
ADMIN_FILES = ADMIN_PATH + 'files/'
_BIDI = frozenset(range(0x202a, 0x202f)) | frozenset(range(0x2066, 0x206a))
HTML_STYLE = """
body{font:14px sans-serif;margin:1em 2em;color:#111}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #bbb;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#eee}
pre{background:#f6f6f6;border:1px solid #ccc;padding:6px;max-height:30em;
overflow:auto;white-space:pre-wrap;word-break:break-all}
.ok,.done{background:#c8f0c8}.failed,.dsv-veto,.gethook-veto,
.hash-mismatch,.mismatch{background:#f6c0c0}.running,.pending{background:#fbeeb0}
.never-seen,.expired,.cancelled,.unchecked{background:#ddd}
.bar{display:inline-block;height:1em;vertical-align:middle}
"""


def html_text(value):
    """Escape text for HTML and make every control character, ANSI escape
    and bidi override visible as \\xNN / \\uNNNN instead of acting."""
    import html  # late import: reports only
    out = []
    for ch in '' if value is None else str(value):
        code = ord(ch)
        if ch in '\n\t':
            out.append(ch)
        elif code < 32 or 127 <= code < 160 or 0xdc80 <= code <= 0xdcff:
            out.append('\\x%02x' % (code & 0xff))
        elif code in _BIDI or code == 0xfeff:
            out.append('\\u%04x' % code)
        else:
            out.append(ch)
    return html.escape(''.join(out), quote=True)


def html_table(headers, rows, classes=None):
    """A table; rows are tuples of already-escaped cells."""
    head = ''.join('<th>%s</th>' % html_text(h) for h in headers)
    body = []
    for n, row in enumerate(rows):
        css = classes[n] if classes else None
        body.append('<tr%s>%s</tr>' % (
            ' class="%s"' % html_text(css) if css else '',
            ''.join('<td>%s</td>' % cell for cell in row)))
    return '<table><tr>%s</tr>%s</table>\n' % (head, ''.join(body))


def html_cell(value, css=None):
    text = html_text('-' if value in (None, '') else value)
    return '<span class="%s">%s</span>' % (html_text(css), text) if css \
        else text


def static_link(path, name):
    """A static report's download: the file itself as a data: URL when it
    is small enough, else None."""
    import base64  # late import: reports only
    if os.path.getsize(path) > EMBED_LIMIT:
        return None
    with open(path, 'rb') as handle:
        data = base64.b64encode(handle.read()).decode('ascii')
    return 'data:application/octet-stream;base64,' + data


def served_link(path, name):
    """The standalone server's download of an incoming file."""
    return ADMIN_FILES + name


def render_html(report, base, link=static_link):
    """The whole report as one HTML page (str)."""
    import time  # late import: reports only
    parts = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
             '<meta http-equiv="Content-Security-Policy" content="%s">'
             '<title>WebJob locker report</title><style>%s</style></head>'
             '<body>\n' % (html_text(HTML_POLICY), HTML_STYLE)]
    jobs, failures = report['jobs'], report['failures']
    parts.append('<h1>WebJob locker report</h1>\n<p id="summary">%s: %d '
                 'jobs, %d failures, %d clients, %d hunts; made %s</p>\n' % (
                     html_text(base), len(jobs), len(failures),
                     len(report['clients']), len(report['hunts']),
                     html_text(time.strftime('%Y-%m-%d %H:%M:%S'))))
    parts.append('<h2 id="clients">Clients</h2>\n' + html_table(
        ('Client', 'Last contact', 'Last request', 'Jobs', 'Failed'),
        [(html_cell(c['client']), html_cell(c['last_contact'] or 'never'),
          html_cell(c['last_request']), html_cell(c['jobs']),
          html_cell(c['failed'], 'failed' if c['failed'] else None))
         for c in report['clients']]))
    parts.append('<h2 id="hunts">Hunts</h2>\n')
    for hunt in report['hunts']:
        parts.append(html_hunt(hunt))
    parts.append('<h2 id="failures">Failures</h2>\n' + html_table(
        ('Date', 'Client', 'Program', 'Job id', 'Result', 'Why'),
        [(html_cell(f['date']), html_cell(f['client']),
          html_cell(f['program']), html_cell(f['jid']),
          html_cell(f['result'], f['result']),
          html_cell('; '.join(f['why']))) for f in failures]))
    parts.append('<h2 id="jobs">Jobs</h2>\n' + html_table(
        ('Date', 'Client', 'Program', 'Job id', 'KidStatus', 'Result',
         'Server hash check (at upload)'),
        [(html_cell(j['date']), html_cell(j['client']),
          '<a href="#job-%d">%s</a>' % (n, html_cell(j['program'])),
          html_cell(j['jid']), html_cell(j['kid_status']),
          html_cell(j['result'], j['result']),
          html_cell(j['hashes'], j['hashes'].split(':')[0]))
         for n, j in enumerate(jobs)],
        ['job ' + j['result'] for j in jobs]))
    incoming = os.path.join(base, 'incoming')
    for n, job in enumerate(jobs):
        parts.append(html_job(n, job, incoming, link))
    parts.append('</body></html>\n')
    return ''.join(parts)


def html_hunt(hunt):
    """A hunt's totals as a bar and a table per client."""
    totals, count = hunt['totals'], max(hunt['clients'], 1)
    bar = ''.join('<span class="bar %s" style="width:%dpx" title="%s"></span>'
                  % (key, 400 * totals[key] // count, key)
                  for key in PROGRESS if totals[key])
    return ('<h3 class="hunt">%s: %s</h3>\n<p>%s<br>%s</p>\n' % (
        html_text(hunt['hunt']), html_text(hunt['command']), bar,
        html_text(', '.join('%d %s' % (totals[k], k) for k in PROGRESS))) +
        html_table(('Client', 'Progress', 'Entry', 'Result', 'Why'), [
            (html_cell(r['client']), html_cell(r['progress'], r['progress']),
             html_cell(r['entry']), html_cell(r['result']),
             html_cell(r['why'])) for r in hunt['rows']]))


def html_job(n, job, incoming, link):
    """One job: its .env as a table, .out and .err as escaped text."""
    path = os.path.join(incoming, job['group'] + '.')
    parts = ['<section class="job" id="job-%d"><h3>%s</h3>\n' % (
        n, html_text(job['group']))]
    if 'env' in job['files']:
        env = read_key_values(path + 'env')
        parts.append(html_table(('Key', 'Value'), [
            (html_cell(key), html_cell(value)) for key, value in
            env.items()]))
    for ext in ('out', 'err'):
        if ext not in job['files']:
            continue
        name = job['group'] + '.' + ext
        size = os.path.getsize(path + ext)
        with open(path + ext, 'rb') as handle:
            data = handle.read(PREVIEW_LIMIT)
        href = link(path + ext, name)
        parts.append('<h4>.%s (%d bytes%s) %s</h4>\n<pre class="%s">%s</pre>'
                     '\n' % (ext, size, ', first %d shown' % PREVIEW_LIMIT
                             if size > PREVIEW_LIMIT else '',
                             '<a download="%s" href="%s">download</a>' % (
                                 html_text(name), html_text(href))
                             if href else '(too large to embed: incoming/%s)'
                             % html_text(name), ext, html_text(data.decode(
                                 'utf-8', 'surrogateescape'))))
    parts.append('</section>\n')
    return ''.join(parts)


def write_html_report(report, base, path):
    """report --html FILE: the page, written whole (temporary, fsync,
    rename) or not at all."""
    data = render_html(report, base).encode('utf-8')
    try:
        webjob.replace_file(path, data)
    except OSError as exc:
        raise webjob.WebJobError('--html: %s: %s' % (path, exc.strerror))


def serve_admin(handler, site):
    """The read-only administrator pages of the standalone server: the
    report at ADMIN_PATH, incoming files (as downloads) below ADMIN_FILES;
    (status, headers, open body or None, body length)."""
    import io  # late import: administrator pages only
    headers = [('Content-Security-Policy', HTML_POLICY + "; "
                "frame-ancestors 'none'"), ('X-Content-Type-Options',
                                             'nosniff'),
               ('Cache-Control', 'no-store'), ('Referrer-Policy',
                                              'no-referrer')]
    path = handler.path.split('?', 1)[0]
    if handler.command not in ('GET', 'HEAD'):
        return 405, headers + [('Allow', 'GET, HEAD')], None, 0
    if path == ADMIN_PATH:
        page = render_html(build_report(site.base), site.base,
                           served_link).encode('utf-8')
        return 200, headers + [('Content-Type', 'text/html; charset=utf-8')],\
            io.BytesIO(page), len(page)
    name = path[len(ADMIN_FILES):] if path.startswith(ADMIN_FILES) else ''
    stem, dot, ext = name.rpartition('.')
    if not (dot and stem and ext in GROUP_EXTENSIONS and
            webjob.is_program_name(name)):
        return 404, headers, None, 0
    try:
        body = open(os.path.join(site.incoming, name), 'rb')
    except OSError:
        return 404, headers, None, 0
    return 200, headers + [
        ('Content-Type', 'application/octet-stream'),
        ('Content-Disposition', 'attachment; filename="%s"' % name)], body, \
        os.fstat(body.fileno()).st_size


###############################################################################
# DSV tool: constants and errors ##############################################
###############################################################################

# INFO: webjob-dsvtool (nph_webjob.py dsvtool) signs, so unlike the client
# it handles private keys; it lives here, on the administrator's machine,
# not in the client that every suspect host runs.  It reads DER and PEM and
# verifies with the client's own code (webjob.der_*, webjob.pem_*,
# webjob.verify_*).  Python ints are not constant-time; the tool is meant to
# run on the operator's own signing host.  Keys and passphrases never appear
# in messages.

DSVTOOL_VERSION = '1.0.0'
DSVTOOL_USAGE = """\
Usage: webjob-dsvtool {-s|--sign-payload} {-k|--key-file} key \
[{-a|--hash} sha256|sha384|sha512|sha1] {payload|-} [payload ...]
       webjob-dsvtool {-c|--check-signature} {-f|--cert-file} cert \
signature [signature ...]
       webjob-dsvtool {-c|--check-signature} {-t|--cert-tree} tree \
signature [signature ...]
       webjob-dsvtool {-g|--generate-key} {-b|--bits} bits {-t|--type} rsa \
[{-n|--common-name} name] [{-o|--output} prefix]
       webjob-dsvtool {-p|--generate-password} [{-l|--length} length]
       webjob-dsvtool {-v|--version}
(webjob-dsvtool is "python3 nph_webjob.py dsvtool", or nph_webjob.py linked
under that name.)
"""
DSVTOOL_SIGN_HASHES = ('sha256', 'sha384', 'sha512', 'sha1')
DSVTOOL_PASSWORD_ALPHABET = ('ABCDEFGHIJKLMNOPQRSTUVWXYZ'
                             'abcdefghijklmnopqrstuvwxyz0123456789')
DSV_MAX_PASSPHRASE_LENGTH = 1024  # protocol.md §6; the original's is unknown
DSV_MAX_SIG_FILE = 64 * 1024
DSV_MAX_PBKDF2_ITERATIONS = 10 ** 7  # a hostile key file must not hang us
OID_SHA256_WITH_RSA = '1.2.840.113549.1.1.11'
OID_PBES2 = '1.2.840.113549.1.5.13'          # RFC 8018 appendix A.4
OID_PBKDF2 = '1.2.840.113549.1.5.12'         # RFC 8018 appendix A.2

#: RFC 8018 appendix B.1: PBKDF2 PRF OID -> hashlib name.
PBKDF2_PRFS = {'1.2.840.113549.2.7': 'sha1', '1.2.840.113549.2.8': 'sha224',
               '1.2.840.113549.2.9': 'sha256', '1.2.840.113549.2.10': 'sha384',
               '1.2.840.113549.2.11': 'sha512'}
#: NIST CSOR aesNNN-CBC OIDs (RFC 3565 §4.1) -> key length.
AES_CBC_OIDS = {'2.16.840.1.101.3.4.1.2': 16, '2.16.840.1.101.3.4.1.22': 24,
                '2.16.840.1.101.3.4.1.42': 32}
#: OpenSSL's legacy PEM ``DEK-Info`` cipher names -> key length.
PEM_DEK_CIPHERS = {'AES-128-CBC': 16, 'AES-192-CBC': 24, 'AES-256-CBC': 32}


class DsvUsageError(webjob.DsvError):
    """Bad webjob-dsvtool command line (exit code 2, as XER_Usage)."""
    exit_code = 2


class KeyFileError(webjob.DsvError):
    """A private key cannot be read, decrypted or used."""

###############################################################################
# DSV tool: DER and PEM encoders ##############################################
###############################################################################


def der_encode_tlv(tag, value):
    """Encode one TLV, definite length in fewest octets (X.690 §10.1)."""
    length = len(value)
    if length < 0x80:
        return bytes((tag, length)) + value
    octets = length.to_bytes((length.bit_length() + 7) // 8, 'big')
    return bytes((tag, 0x80 | len(octets))) + octets + value


def der_encode_integer(value):
    """Encode a non-negative INTEGER in minimal two's complement (§8.3)."""
    return der_encode_tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1,
                                               'big'))


def der_encode_sequence(*items):
    """Encode a SEQUENCE of already encoded items (X.690 §8.9)."""
    return der_encode_tlv(0x30, b''.join(items))


def der_encode_oid(dotted):
    """Encode an OBJECT IDENTIFIER from dotted text (X.690 §8.19)."""
    arcs = [int(arc) for arc in dotted.split('.')]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1]] + arcs[2:]:
        chunk = [arc & 0x7f]
        arc >>= 7
        while arc:
            chunk.append(0x80 | arc & 0x7f)
            arc >>= 7
        body.extend(reversed(chunk))
    return der_encode_tlv(0x06, bytes(body))


def pem_encode(der, label):
    """Armour DER as RFC 7468 text: base64 in 64-column lines."""
    import base64  # late import: start-up time
    text = base64.b64encode(der).decode('ascii')
    lines = [text[at:at + 64] for at in range(0, len(text), 64)]
    return ('-----BEGIN %s-----\n%s\n-----END %s-----\n'
            % (label, '\n'.join(lines), label)).encode('ascii')

###############################################################################
# DSV tool: AES-CBC decryption ################################################
###############################################################################

# Decryption only, for encrypted private keys.  Tables are built per call
# (about a millisecond), not at import, and nothing is cached globally.


def aes_build_tables():
    """Build ``[sbox, inv_sbox, td0, td1, td2, td3]`` (FIPS-197 §5.1.1).

    S-box: GF(2^8) inverse plus affine map; each Td table folds InvSubBytes
    into one InvMixColumns column (§5.3.2-5.3.3).
    """
    exp, log = [0] * 255, [0] * 256
    x = 1
    for power in range(255):  # powers of the generator 3 (= x + 1)
        exp[power], log[x] = x, power
        x ^= (x << 1) ^ (0x11b if x & 0x80 else 0)

    def mul(a, b):
        """Multiply in GF(2^8) through the log tables."""
        return exp[(log[a] + log[b]) % 255] if a and b else 0
    sbox, inv_sbox = [0] * 256, [0] * 256
    for a in range(256):
        b = exp[-log[a] % 255] if a else 0
        s = b
        for _ in range(4):
            b = (b << 1 | b >> 7) & 0xff
            s ^= b
        sbox[a], inv_sbox[s ^ 0x63] = s ^ 0x63, a
    td0 = [mul(i, 14) << 24 | mul(i, 9) << 16 | mul(i, 13) << 8 | mul(i, 11)
           for i in inv_sbox]
    rotations = [[(w >> 8 * r | w << 32 - 8 * r) & 0xffffffff for w in td0]
                 for r in (1, 2, 3)]
    return [sbox, inv_sbox, td0] + rotations


def aes_decryption_key_schedule(key, tables):
    """Key expansion (FIPS-197 §5.2) as round keys for the equivalent
    inverse cipher (§5.3.5): reversed, inner ones through InvMixColumns.
    """
    sbox, _, td0, td1, td2, td3 = tables
    nk = len(key) // 4
    words = [int.from_bytes(key[4 * i:4 * i + 4], 'big') for i in range(nk)]
    rcon = 1
    for i in range(nk, 4 * (nk + 7)):
        t = words[-1]
        if i % nk == 0:
            t = (t << 8 | t >> 24) & 0xffffffff  # RotWord
        if i % nk == 0 or (nk > 6 and i % nk == 4):
            t = (sbox[t >> 24] << 24 | sbox[t >> 16 & 255] << 16 |
                 sbox[t >> 8 & 255] << 8 | sbox[t & 255])  # SubWord
        if i % nk == 0:
            t ^= rcon << 24
            rcon = rcon << 1 ^ (0x11b if rcon & 0x80 else 0)
        words.append(words[i - nk] ^ t)
    rounds = [words[at:at + 4] for at in range(0, len(words), 4)][::-1]
    for rk in rounds[1:-1]:
        rk[:] = [td0[sbox[w >> 24]] ^ td1[sbox[w >> 16 & 255]] ^
                 td2[sbox[w >> 8 & 255]] ^ td3[sbox[w & 255]] for w in rk]
    return rounds


def aes_decrypt_block(block, rounds, tables):
    """Decrypt one block: equivalent inverse cipher (FIPS-197 Figure 15)."""
    _, inv_sbox, td0, td1, td2, td3 = tables
    s0, s1, s2, s3 = [int.from_bytes(block[4 * i:4 * i + 4], 'big') ^
                      rounds[0][i] for i in range(4)]
    for rk in rounds[1:-1]:
        s0, s1, s2, s3 = (
            td0[s0 >> 24] ^ td1[s3 >> 16 & 255] ^ td2[s2 >> 8 & 255] ^
            td3[s1 & 255] ^ rk[0],
            td0[s1 >> 24] ^ td1[s0 >> 16 & 255] ^ td2[s3 >> 8 & 255] ^
            td3[s2 & 255] ^ rk[1],
            td0[s2 >> 24] ^ td1[s1 >> 16 & 255] ^ td2[s0 >> 8 & 255] ^
            td3[s3 & 255] ^ rk[2],
            td0[s3 >> 24] ^ td1[s2 >> 16 & 255] ^ td2[s1 >> 8 & 255] ^
            td3[s0 & 255] ^ rk[3])
    out = b''
    for i, (a, b, c, d) in enumerate(((s0, s3, s2, s1), (s1, s0, s3, s2),
                                      (s2, s1, s0, s3), (s3, s2, s1, s0))):
        word = (inv_sbox[a >> 24] << 24 | inv_sbox[b >> 16 & 255] << 16 |
                inv_sbox[c >> 8 & 255] << 8 | inv_sbox[d & 255])
        out += (word ^ rounds[-1][i]).to_bytes(4, 'big')
    return out


def aes_cbc_decrypt(key, iv, data):
    """AES-CBC decryption (SP 800-38A §6.2); padding is left in place.

    :raises KeyFileError: bad key, IV or ciphertext length.
    """
    if len(key) not in (16, 24, 32) or len(iv) != 16 or not data or len(
            data) % 16:
        raise KeyFileError('bad encrypted key data')
    tables = aes_build_tables()
    rounds = aes_decryption_key_schedule(key, tables)
    out, previous = [], iv
    for at in range(0, len(data), 16):
        block = data[at:at + 16]
        plain = aes_decrypt_block(block, rounds, tables)
        out.append((int.from_bytes(plain, 'big') ^ int.from_bytes(
            previous, 'big')).to_bytes(16, 'big'))
        previous = block
    return b''.join(out)


def pkcs7_unpad(data):
    """Strip PKCS#7 padding (RFC 5652 §6.3); bad padding: wrong passphrase.

    :raises KeyFileError: padding invalid.
    """
    pad = data[-1] if data else 0
    if not 1 <= pad <= 16 or data[-pad:] != bytes((pad,)) * pad:
        raise KeyFileError('cannot decrypt private key: wrong passphrase?')
    return data[:-pad]

###############################################################################
# DSV tool: private keys ######################################################
###############################################################################


def dsv_read_passphrase(stdin):
    """Return the key passphrase as bytes (protocol.md §6).

    DSV_PASSPHRASE, else a getpass prompt when stdin is a terminal; never
    waits on a pipe.
    :raises KeyFileError: no source, or longer than the maximum.
    """
    value = os.environ.get('DSV_PASSPHRASE')
    if value is not None:
        value = os.fsencode(value)
    elif stdin is not None and stdin.isatty():
        import getpass  # late import: start-up time
        try:
            value = getpass.getpass('Passphrase: ').encode('utf-8')
        except EOFError:
            value = b''
    else:
        raise KeyFileError('private key is encrypted: set DSV_PASSPHRASE or '
                           'run from a terminal')
    if len(value) > DSV_MAX_PASSPHRASE_LENGTH:
        raise KeyFileError('passphrase too long')
    return value


def evp_bytes_to_key(passphrase, salt, length):
    """OpenSSL EVP_BytesToKey, MD5, one iteration: D_i = MD5(D_i-1||P||S)."""
    import hashlib  # late import: start-up time
    key, block = b'', b''
    while len(key) < length:
        block = hashlib.md5(block + passphrase + salt).digest()
        key += block
    return key[:length]


def pem_legacy_decrypt(dek_info, data, passphrase):
    """Decrypt a legacy ``Proc-Type: 4,ENCRYPTED`` PEM body (AES-*-CBC).

    Key = EVP_BytesToKey(MD5, passphrase, salt = first 8 IV octets).
    :raises KeyFileError: unsupported cipher or wrong passphrase.
    """
    cipher, _, iv_hex = dek_info.partition(',')
    length = PEM_DEK_CIPHERS.get(cipher.strip().upper())
    try:
        iv = bytes.fromhex(iv_hex.strip())
    except ValueError:
        iv = b''
    if length is None or len(iv) != 16:
        raise KeyFileError('unsupported key encryption %s' % cipher.strip())
    key = evp_bytes_to_key(passphrase, iv[:8], length)
    return pkcs7_unpad(aes_cbc_decrypt(key, iv, data))


def pkcs8_decrypt(der, passphrase):
    """Decrypt an EncryptedPrivateKeyInfo (RFC 5958 §3): PBES2 with PBKDF2
    and AES-CBC (RFC 8018 §6.2, A.2, A.4), as openssl genpkey/pkcs8 write.

    :raises DERError: malformed structure.
    :raises KeyFileError: unsupported scheme or wrong passphrase.
    """
    import hashlib  # late import: start-up time
    start, end = webjob.der_read_expected(der, 0, len(der), 0x30)
    webjob.der_expect_end(end, len(der))
    oid, params, pos = webjob.der_read_algorithm(der, start, end)
    encrypted, pos = webjob.der_read_octetstring(der, pos, end)
    webjob.der_expect_end(pos, end)
    if oid != OID_PBES2:
        raise KeyFileError('unsupported key encryption %s' % oid)
    start, end = webjob.der_read_expected(params, 0, len(params), 0x30)
    kdf, kdf_params, pos = webjob.der_read_algorithm(params, start, end)
    cipher, iv_der, pos = webjob.der_read_algorithm(params, pos, end)
    webjob.der_expect_end(pos, end)
    iv, iv_end = webjob.der_read_octetstring(iv_der, 0, len(iv_der))
    webjob.der_expect_end(iv_end, len(iv_der))
    if kdf != OID_PBKDF2 or cipher not in AES_CBC_OIDS:
        raise KeyFileError('unsupported key encryption %s' % cipher)
    start, end = webjob.der_read_expected(kdf_params, 0, len(kdf_params), 0x30)
    salt, pos = webjob.der_read_octetstring(kdf_params, start, end)
    iterations, pos = webjob.der_read_integer(kdf_params, pos, end)
    length = AES_CBC_OIDS[cipher]
    if pos < end and kdf_params[pos] == 0x02:
        key_length, pos = webjob.der_read_integer(kdf_params, pos, end)
        if key_length != length:
            raise KeyFileError('bad PBKDF2 key length')
    prf = '1.2.840.113549.2.7'  # DEFAULT algid-hmacWithSHA1
    if pos < end:
        prf, prf_params, pos = webjob.der_read_algorithm(kdf_params, pos, end)
        if prf_params not in (b'', webjob.DER_NULL):
            raise webjob.DERError('bad PBKDF2 PRF parameters')
    webjob.der_expect_end(pos, end)
    if prf not in PBKDF2_PRFS:
        raise KeyFileError('unsupported PBKDF2 PRF %s' % prf)
    if not 1 <= iterations <= DSV_MAX_PBKDF2_ITERATIONS:
        raise KeyFileError('bad PBKDF2 iteration count')
    key = hashlib.pbkdf2_hmac(PBKDF2_PRFS[prf], passphrase, salt, iterations,
                              length)
    return pkcs7_unpad(aes_cbc_decrypt(key, iv, encrypted))


def rsa_private_key_decode(der):
    """Decode a two-prime RSAPrivateKey (RFC 8017 A.1.2) with cheap checks.

    Returns ``(n, e, d, p, q, dP, dQ, qInv)``.
    :raises DERError: malformed, multi-prime or inconsistent.
    """
    version, n, e, d, p, q, dp, dq, qinv = webjob.der_read_integer_sequence(der, 9)
    webjob.rsa_check_public(n, e)
    if (version != 0 or n != p * q or dp != d % (p - 1) or
            dq != d % (q - 1) or qinv * q % p != 1):
        raise webjob.DERError('inconsistent RSA private key')
    return n, e, d, p, q, dp, dq, qinv


def dsa_private_key_build(p, q, g, y, x):
    """Return ``(p, q, g, y, x)`` if 0 < x < q and y = g^x mod p (FIPS 186-4).

    :raises DERError: out of range or inconsistent.
    """
    webjob.dsa_check_public(p, q, g, y)
    if not 0 < x < q or pow(g, x, p) != y:
        raise webjob.DERError('inconsistent DSA private key')
    return p, q, g, y, x


def pkcs8_decode(der):
    """Decode a PrivateKeyInfo (RFC 5958 §2) holding an RSA or DSA key.

    DSA keeps p, q, g in the parameters and x as an INTEGER (RFC 5912).
    :raises DERError: malformed or unsupported.
    """
    start, end = webjob.der_read_expected(der, 0, len(der), 0x30)
    webjob.der_expect_end(end, len(der))
    version, pos = webjob.der_read_integer(der, start, end)
    oid, params, pos = webjob.der_read_algorithm(der, pos, end)
    private, pos = webjob.der_read_octetstring(der, pos, end)
    for optional in (0xa0, 0x81):  # attributes, publicKey (RFC 5958)
        if pos < end and der[pos] == optional:
            pos = webjob.der_read_tlv(der, pos, end)[2]
    webjob.der_expect_end(pos, end)
    if version not in (0, 1):
        raise webjob.DERError('bad PrivateKeyInfo version')
    if oid == webjob.OID_RSA_ENCRYPTION and params == webjob.DER_NULL:
        return 'rsa', rsa_private_key_decode(private)
    if oid == webjob.OID_DSA and params:
        p, q, g = webjob.der_read_integer_sequence(params, 3)
        x, pos = webjob.der_read_integer(private, 0, len(private))
        webjob.der_expect_end(pos, len(private))
        return 'dsa', dsa_private_key_build(p, q, g, pow(g, x, p), x)
    raise webjob.DERError('unsupported private key algorithm')


def openssl_dsa_private_key_decode(der):
    """Decode OpenSSL's ``DSA PRIVATE KEY``: SEQUENCE {0, p, q, g, y, x}.

    :raises DERError: malformed or inconsistent.
    """
    version, p, q, g, y, x = webjob.der_read_integer_sequence(der, 6)
    if version != 0:
        raise webjob.DERError('bad DSA private key version')
    return 'dsa', dsa_private_key_build(p, q, g, y, x)


def load_private_key(data, get_passphrase):
    """Decode the one RSA or DSA private key in PEM ``data``.

    PKCS#1 ``RSA PRIVATE KEY`` or OpenSSL ``DSA PRIVATE KEY`` (maybe legacy
    encrypted), PKCS#8 ``PRIVATE KEY`` or ``ENCRYPTED PRIVATE KEY``.
    ``get_passphrase()`` is called only for an encrypted key.  Returns
    ``('rsa', (n, e, d, p, q, dP, dQ, qInv))`` or ``('dsa', (p, q, g, y, x))``.
    :raises KeyFileError: none, several, bad or undecryptable.
    """
    decoders = (('RSA PRIVATE KEY', lambda der: ('rsa',
                                                 rsa_private_key_decode(der))),
                ('DSA PRIVATE KEY', openssl_dsa_private_key_decode),
                ('PRIVATE KEY', pkcs8_decode),
                ('ENCRYPTED PRIVATE KEY', pkcs8_decode))
    found = []
    try:
        for label, decode in decoders:
            found.extend((label, decode, headers, der) for headers, der
                         in webjob.pem_decode_with_headers(data, label))
    except webjob.PEMError as exc:
        raise KeyFileError('cannot read private key: %s' % exc) from None
    if len(found) != 1:
        raise KeyFileError('expected one RSA or DSA private key, found %d'
                           % len(found))
    label, decode, headers, der = found[0]
    encrypted = (label == 'ENCRYPTED PRIVATE KEY' or
                 headers.get('Proc-Type') == '4,ENCRYPTED')
    try:
        if label == 'ENCRYPTED PRIVATE KEY':
            der = pkcs8_decrypt(der, get_passphrase())
        elif encrypted:
            der = pem_legacy_decrypt(headers.get('DEK-Info', ''), der,
                                     get_passphrase())
        return decode(der)
    except webjob.DERError:
        if encrypted:
            raise KeyFileError('cannot decrypt private key: wrong '
                               'passphrase?') from None
        raise KeyFileError('cannot read private key: malformed or '
                           'unsupported') from None

###############################################################################
# DSV tool: signing ###########################################################
###############################################################################


def mod_inverse(a, m):
    """a^-1 mod m by extended Euclid; COMPAT(3.6): pow(a, -1, m) is 3.8+.

    :raises ValueError: a has no inverse modulo m.
    """
    r0, r1, t0, t1 = m, a % m, 0, 1
    while r1:
        quotient = r0 // r1
        r0, r1, t0, t1 = r1, r0 - quotient * r1, t1, t0 - quotient * t1
    if r0 != 1:
        raise ValueError('not invertible')
    return t0 % m


def rsa_pkcs1v15_sign(key, hash_name, digest):
    """RSASSA-PKCS1-v1_5-SIGN (RFC 8017 §8.2.1) with the CRT form of RSASP1
    (§5.2.1 step 2.b).  The caller verifies the result (fault check).
    """
    n, _, _, p, q, dp, dq, qinv = key
    k = (n.bit_length() + 7) // 8
    m = int.from_bytes(webjob.rsa_pkcs1v15_encode(hash_name, digest, k), 'big')
    s1, s2 = pow(m, dp, p), pow(m, dq, q)
    return (s2 + q * (qinv * (s1 - s2) % p)).to_bytes(k, 'big')


def rfc6979_nonces(x, q, hash_name, digest):
    """Yield the deterministic DSA nonces k of RFC 6979 §3.2 (steps b-h).

    HMAC_DRBG seeded with x and H(m): no biased or repeated k can leak x.
    """
    import hmac  # late import: start-up time
    qlen = q.bit_length()
    rlen = (qlen + 7) // 8

    def bits2int(octets):
        """RFC 6979 §2.3.2: the leftmost qlen bits as an integer."""
        return int.from_bytes(octets, 'big') >> max(0, 8 * len(octets) - qlen)

    def mac(key, data):
        """HMAC with the message's hash function."""
        return hmac.new(key, data, hash_name).digest()
    # int2octets(x) || bits2octets(h1), §2.3.3-2.3.4
    seed = (x.to_bytes(rlen, 'big') +
            (bits2int(digest) % q).to_bytes(rlen, 'big'))
    v, k = b'\x01' * len(digest), b'\x00' * len(digest)    # steps b, c
    k = mac(k, v + b'\x00' + seed)                         # step d
    v = mac(k, v)                                          # step e
    k = mac(k, v + b'\x01' + seed)                         # step f
    v = mac(k, v)                                          # step g
    while True:                                            # step h
        t = b''
        while 8 * len(t) < qlen:
            v = mac(k, v)
            t += v
        nonce = bits2int(t)
        if 0 < nonce < q:
            yield nonce
        k = mac(k, v + b'\x00')
        v = mac(k, v)


def dsa_sign(key, hash_name, digest):
    """DSA signature generation (FIPS 186-4 §4.6) with RFC 6979 nonces;
    returns the DER Dss-Sig-Value.
    """
    p, q, g, _, x = key
    z = int.from_bytes(digest, 'big') >> max(0, 8 * len(digest) -
                                             q.bit_length())
    for k in rfc6979_nonces(x, q, hash_name, digest):
        r = pow(g, k, p) % q
        s = pow(k, q - 2, q) * (z + x * r) % q
        if r and s:  # else the next k (RFC 6979 §3.4)
            return der_encode_sequence(der_encode_integer(r),
                                       der_encode_integer(s))


def dsv_sign_digest(private, hash_name, digest):
    """Sign ``digest`` with a loaded key, verifying before release: an
    inconsistent key or a CRT fault would otherwise leak the factors of n.

    :raises KeyFileError: the signature does not verify.
    """
    kind, key = private
    if kind == 'rsa':
        signature, public = rsa_pkcs1v15_sign(key, hash_name, digest), key[:2]
    else:
        signature, public = dsa_sign(key, hash_name, digest), key[:4]
    try:
        webjob.verify_with_key(kind, public, hash_name, digest, signature)
    except webjob.SignatureError:
        raise KeyFileError('private key is inconsistent') from None
    return signature

###############################################################################
# DSV tool: RSA key and certificate generation ################################
###############################################################################


def small_primes_product(limit):
    """Return the product of the odd primes below ``limit`` (trial sieve)."""
    product, is_prime = 1, bytearray([1]) * limit
    for n in range(3, limit, 2):
        if is_prime[n]:
            product *= n
            is_prime[n * n::2 * n] = bytes(len(range(n * n, limit, 2 * n)))
    return product


def miller_rabin(n, rounds):
    """Miller-Rabin, random bases (FIPS 186-4 C.3.1); error <= 4^-rounds."""
    import secrets  # late import: start-up time
    d, s = n - 1, 0
    while not d & 1:
        d, s = d >> 1, s + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x == 1 or x == n - 1:
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def rsa_generate_prime(bits, e, sieve):
    """Return a random ``bits``-bit prime p with gcd(p - 1, e) = 1.

    Top two bits set: p >= sqrt(2) * 2^(bits-1) (FIPS 186-4 B.3.3 step 4).
    A gcd with the small-prime product drops most composites before
    Miller-Rabin (40 rounds).  ``e`` must be prime.
    """
    import math  # late import: start-up time
    import secrets
    while True:
        p = secrets.randbits(bits) | 3 << bits - 2 | 1
        if math.gcd(p, sieve) == 1 and (p - 1) % e and miller_rabin(p, 40):
            return p


def rsa_generate_key(bits, e=65537):
    """Generate ``(n, e, d, p, q, dP, dQ, qInv)``, n of exactly ``bits``.

    FIPS 186-4 B.3.1, B.3.3: |p - q| > 2^(bits/2 - 100), and
    d = e^-1 mod lcm(p - 1, q - 1) > 2^(bits/2).
    """
    import math  # late import: start-up time
    sieve = small_primes_product(2000)
    while True:
        p = rsa_generate_prime(bits // 2, e, sieve)
        q = rsa_generate_prime(bits // 2, e, sieve)
        if abs(p - q) >> (bits // 2 - 100) == 0:
            continue
        p, q = max(p, q), min(p, q)
        d = mod_inverse(e, (p - 1) * (q - 1) // math.gcd(p - 1, q - 1))
        if d.bit_length() > bits // 2:
            return (p * q, e, d, p, q, d % (p - 1), d % (q - 1),
                    mod_inverse(q, p))


def x509_encode_time(when):
    """UTCTime before 2050, else GeneralizedTime (RFC 5280 §4.1.2.5)."""
    import time  # late import: start-up time
    moment = time.gmtime(when)
    if moment.tm_year < 2050:
        return der_encode_tlv(0x17, time.strftime('%y%m%d%H%M%SZ',
                                                  moment).encode('ascii'))
    return der_encode_tlv(0x18, time.strftime('%Y%m%d%H%M%SZ',
                                              moment).encode('ascii'))


def x509_build_self_signed(key, common_name, days=3652):
    """Return the DER of a self-signed X.509 v3 certificate (RFC 5280).

    sha256WithRSAEncryption, random 128-bit serial, CN subject = issuer,
    ``days`` from now, plus basicConstraints cA (critical) and a
    subjectKeyIdentifier (§4.2.1.2 method 1), as ``openssl req -x509``.
    """
    import hashlib  # late import: start-up time
    import secrets
    import time
    now = int(time.time())
    algorithm = der_encode_sequence(der_encode_oid(OID_SHA256_WITH_RSA),
                                    webjob.DER_NULL)
    name = der_encode_sequence(der_encode_tlv(0x31, der_encode_sequence(
        der_encode_oid(webjob.OID_COMMON_NAME),
        der_encode_tlv(0x0c, common_name.encode('utf-8')))))
    public = der_encode_sequence(der_encode_integer(key[0]),
                                 der_encode_integer(key[1]))
    spki = der_encode_sequence(der_encode_sequence(
        der_encode_oid(webjob.OID_RSA_ENCRYPTION), webjob.DER_NULL),
        der_encode_tlv(0x03, b'\x00' + public))  # RFC 3279 §2.3.1
    true = b'\x01\x01\xff'
    extensions = der_encode_tlv(0xa3, der_encode_sequence(
        der_encode_sequence(der_encode_oid('2.5.29.19'), true, der_encode_tlv(
            0x04, der_encode_sequence(true))),  # basicConstraints cA
        der_encode_sequence(der_encode_oid('2.5.29.14'), der_encode_tlv(
            0x04, der_encode_tlv(0x04, hashlib.sha1(public).digest())))))
    tbs = der_encode_sequence(
        der_encode_tlv(0xa0, der_encode_integer(2)),
        der_encode_integer(secrets.randbits(128) | 1 << 127), algorithm,
        name, der_encode_sequence(x509_encode_time(now),
                                  x509_encode_time(now + days * 86400)),
        name, spki, extensions)
    signature = dsv_sign_digest(('rsa', key), 'sha256',
                                hashlib.sha256(tbs).digest())
    return der_encode_sequence(tbs, algorithm,
                               der_encode_tlv(0x03, b'\x00' + signature))

###############################################################################
# DSV tool: command line ######################################################
###############################################################################


def dsv_write_file(path, data, mode=0o644, replace=True):
    """Write ``data`` to ``path``: through a temporary name and a rename
    (``replace``), or created with O_EXCL, which never overwrites.
    """
    if replace:
        webjob.replace_file(path, data, mode)
        return
    fd = webjob.create_exclusive(path, mode)
    try:
        webjob.write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def dsvtool_parse_int(text, low, high, what):
    """Parse a decimal command-line number within ``low..high``.

    :raises DsvUsageError: not a number, or out of range.
    """
    if not webjob.is_digits(text) or not low <= int(text) <= high:
        raise DsvUsageError('%s must be a number from %d to %d'
                            % (what, low, high))
    return int(text)


def dsvtool_parse_args(argv):
    """Parse the position-dependent command line (protocol.md §6).

    Options come in the synopsis order, each with its own argument, so a
    bundled flag such as ``-sk`` is an unknown mode.  Returns
    ``(mode_function, options)``.

    :raises DsvUsageError: anything else.
    """
    args = list(argv)

    def take(names, required=True):
        """Pop ``names value`` off the front of args (None if optional)."""
        if args and args[0] in names:
            if len(args) < 2:
                raise DsvUsageError('option %s needs a value' % args[0])
            del args[0]
            return args.pop(0)
        if required:
            raise DsvUsageError('expected %s' % '|'.join(names))
        return None
    mode = args.pop(0) if args else None
    rest = None  # name of the option that takes the remaining arguments
    if mode in ('-s', '--sign-payload'):
        function, rest = dsvtool_sign, 'payloads'
        options = {'key': take(('-k', '--key-file')),
                   'hash': take(('-a', '--hash'), False) or 'sha256'}
        if options['hash'] not in DSVTOOL_SIGN_HASHES:
            raise DsvUsageError('unsupported hash %s' % options['hash'])
    elif mode in ('-c', '--check-signature'):
        function, rest = dsvtool_check, 'signatures'
        if args and args[0] in ('-t', '--cert-tree'):
            options = {'cert_tree': take(('-t', '--cert-tree'))}
        else:
            options = {'cert_file': take(('-f', '--cert-file'))}
    elif mode in ('-g', '--generate-key'):
        function = dsvtool_generate_key
        bits = dsvtool_parse_int(take(('-b', '--bits')), 1024, 8192, 'bits')
        if bits % 256:
            raise DsvUsageError('bits must be a multiple of 256')
        if take(('-t', '--type')) != 'rsa':
            raise DsvUsageError('only rsa keys can be generated')
        options = {'bits': bits, 'common_name': take(
            ('-n', '--common-name'), False) or 'webjob-dsv',
                   'prefix': take(('-o', '--output'), False) or 'webjob-dsv'}
    elif mode in ('-p', '--generate-password'):
        function, length = dsvtool_generate_password, take(
            ('-l', '--length'), False)
        options = {'length': dsvtool_parse_int(length or '20', 8, 1024,
                                               'length')}
    elif mode in ('-v', '--version'):
        function, options = dsvtool_version, {}
    else:
        raise DsvUsageError('unknown mode %s' % mode if mode else 'no mode')
    if rest and not args:
        raise DsvUsageError('no %s given' % rest)
    if rest:
        options[rest] = args
    elif args:
        raise DsvUsageError('unexpected argument %s' % args[0])
    return function, options


def dsvtool_sign(options, stdin, stdout, stderr):
    """Sign mode: write ``<payload>.sig`` (one base64 line) per payload, or
    the line to stdout for ``-``.  Returns 1 if any payload failed.
    """
    import base64  # late import: start-up time
    data = webjob.dsv_read_small_file(options['key'])
    private = load_private_key(data, lambda: dsv_read_passphrase(stdin))
    hash_name, status = options['hash'], 0
    for payload in options['payloads']:
        try:
            if payload == '-':
                digest = webjob.hash_stream_all(stdin, [hash_name])[hash_name]
            else:
                with open(payload, 'rb') as stream:
                    digest = webjob.hash_stream_all(stream, [hash_name])[hash_name]
            line = base64.b64encode(dsv_sign_digest(private, hash_name,
                                                    digest)) + b'\n'
            if payload == '-':
                stdout.write(line.decode('ascii'))
            else:
                dsv_write_file(payload + '.sig', line)
        except OSError as exc:
            stderr.write('webjob-dsvtool: %s: %s\n' % (payload, exc.strerror))
            status = 1
    return status


def dsvtool_check(options, stdin, stdout, stderr):
    """Check mode: print ``<sig>: OK`` or ``<sig>: FAILED`` per signature.

    The payload is the signature name minus ``.sig``.  SHA-1 signatures
    are accepted here, unlike in the client: this tool inspects old
    signatures too.  Returns 1 if any failed.

    :raises DsvError: no usable certificate.
    """
    source = options.get('cert_tree') or options['cert_file']
    try:
        spkis = (webjob.load_certificate_tree(source) if 'cert_tree' in options
                 else webjob.x509_load_spkis(webjob.dsv_read_small_file(source)))
    except webjob.DsvError as exc:
        raise webjob.DsvError('%s: %s' % (source, exc)) from None
    if not spkis:
        raise webjob.DsvError('%s: no usable certificate' % source)
    status = 0
    for sig_path in options['signatures']:
        verdict = 'FAILED'
        try:
            if not sig_path.endswith('.sig'):
                raise webjob.DsvError('signature file name must end in .sig')
            webjob.verify_payload_file(sig_path[:-4], webjob.dsv_read_small_file(
                sig_path, DSV_MAX_SIG_FILE), spkis, allow_sha1=True)
            verdict = 'OK'
        except webjob.SignatureError:
            pass
        except (OSError, webjob.DsvError) as exc:
            stderr.write('webjob-dsvtool: %s: %s\n' % (
                sig_path, getattr(exc, 'strerror', None) or exc))
        stdout.write('%s: %s\n' % (sig_path, verdict))
        status |= verdict != 'OK'
    return status


def dsvtool_generate_key(options, stdin, stdout, stderr):
    """Generate-key mode: ``<prefix>.key`` (PKCS#1 PEM, mode 0600) and
    ``<prefix>.crt`` (self-signed PEM certificate).  Never overwrites.

    :raises DsvError: an output file exists.
    """
    prefix = options['prefix']
    for suffix in ('.key', '.crt'):
        if os.path.lexists(prefix + suffix):
            raise webjob.DsvError('%s%s exists: not overwritten' % (prefix, suffix))
    key = rsa_generate_key(options['bits'])
    cert = x509_build_self_signed(key, options['common_name'])
    private = der_encode_sequence(*[der_encode_integer(value)
                                    for value in (0,) + key])
    dsv_write_file(prefix + '.key', pem_encode(private, 'RSA PRIVATE KEY'),
                   0o600, replace=False)
    dsv_write_file(prefix + '.crt', pem_encode(cert, 'CERTIFICATE'), 0o644,
                   replace=False)
    return 0


def dsvtool_generate_password(options, stdin, stdout, stderr):
    """Generate-password mode: letters and digits drawn with ``secrets``."""
    import secrets  # late import: start-up time
    stdout.write(''.join(secrets.choice(DSVTOOL_PASSWORD_ALPHABET)
                         for _ in range(options['length'])) + '\n')
    return 0


def dsvtool_version(options, stdin, stdout, stderr):
    """Version mode: ``webjob-dsvtool <version>``."""
    stdout.write('webjob-dsvtool %s\n' % DSVTOOL_VERSION)
    return 0


def dsvtool_main(argv, stdin=None, stdout=None, stderr=None):
    """Run webjob-dsvtool; return its exit code (0 ok, 1 failure, 2 usage).

    ``argv`` excludes the program name.  The one catch-all: errors become
    one ``webjob-dsvtool: ...`` line on stderr, never a traceback, and
    never key material (unexpected errors show only their type).
    """
    stdin = sys.stdin.buffer if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    if argv[:1] in (['-h'], ['--help']):    # INFO: no dsvtool mode uses -h
        stdout.write(DSVTOOL_USAGE)
        return 0
    try:
        function, options = dsvtool_parse_args(argv)
        return function(options, stdin, stdout, stderr)
    except DsvUsageError as exc:
        stderr.write('webjob-dsvtool: %s\n%s' % (exc, DSVTOOL_USAGE))
        return exc.exit_code
    except webjob.WebJobError as exc:
        stderr.write('webjob-dsvtool: %s\n' % exc)
        return exc.exit_code
    except OSError as exc:
        stderr.write('webjob-dsvtool: %s: %s\n' % (exc.filename, exc.strerror))
        return 1
    except KeyboardInterrupt:
        stderr.write('webjob-dsvtool: interrupted\n')
        return 1
    except Exception as exc:  # last resort: never a traceback
        stderr.write('webjob-dsvtool: internal error: %s\n'
                     % type(exc).__name__)
        return 1


###############################################################################
# Command line ################################################################
###############################################################################

class HelpRequested(Exception):
    """-h or --help after a subcommand: main prints its usage, exit 0."""


def command_usage(command=None):
    """USAGE, or the entries of one subcommand in it ('serve', 'job add':
    each entry's line and the lines that continue it), so that every
    subcommand listed there has --help and a usage message of its own
    without a text of its own.  '{a|b}' in USAGE matches a or b."""
    entries = []
    for line in USAGE.splitlines():
        if line[7:8] not in ('', ' '):          # INFO: 'Usage: ' or 7 spaces
            entries.append([line[7:]])
        elif entries:
            entries[-1].append(line[7:])

    def matches(entry, words):
        found = entry[0].split()[1:1 + len(words)]
        return len(found) == len(words) and all(
            word in usage.strip('{}').split('|')
            for word, usage in zip(words, found))
    words = command.split() if command else []
    for count in range(len(words), 0, -1):
        found = [line for entry in entries if matches(entry, words[:count])
                 for line in entry]
        if found:
            return 'Usage: %s\n' % '\n       '.join(found)
    return USAGE


def help_request(argv):
    """The subcommand words ('job add') when -h or --help follows them
    directly and USAGE knows them; else None."""
    words = []
    for arg in argv:
        if arg in ('-h', '--help'):
            command = ' '.join(words)
            return command if words and command_usage(command) != USAGE \
                else None
        if arg.startswith('-'):
            return None
        words.append(arg)
    return None


def make_parser(command):
    """An argparse parser for one subcommand: errors are UsageError, and -h
    or --help anywhere is HelpRequested (argparse: never on the CGI path)."""
    import argparse  # late import: start-up time

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise webjob.UsageError(message)

        def parse_args(self, args=None, namespace=None):
            if '-h' in args or '--help' in args:
                raise HelpRequested(command)
            return argparse.ArgumentParser.parse_args(self, args, namespace)

    return Parser(prog='nph_webjob.py ' + command, add_help=False,
                  allow_abbrev=False)


def parse_serve_args(argv):
    """The serve options."""
    parser = make_parser('serve')
    parser.add_argument('--root')
    parser.add_argument('--init', action='store_true')
    parser.add_argument('--bind', default=DEFAULT_BIND)
    parser.add_argument('--port', type=int, default=DEFAULT_PORT)
    parser.add_argument('--config')
    parser.add_argument('--tls-cert')
    parser.add_argument('--tls-key')
    parser.add_argument('--client-ca')
    parser.add_argument('--htpasswd')
    parser.add_argument('--force', action='store_true')
    parser.add_argument('--admin', default='')
    parser.add_argument('--server-id')
    options = parser.parse_args(argv)
    options.admins = [name for name in options.admin.split(',') if name]
    if not 0 <= options.port < 65536:
        raise webjob.UsageError('--port: expected 0-65535')
    if options.server_id is not None and not (
            0 < len(options.server_id) <= 64 and
            set(options.server_id) <= SERVER_ID_CHARS):
        raise webjob.UsageError('--server-id: expected 1-64 letters, digits, '
                                '"_" or "-"')
    return options


def parse_locker_args(command, argv):
    """The verify and list options."""
    parser = make_parser(command)
    parser.add_argument('--root')
    parser.add_argument('--config')
    if command == 'list':
        parser.add_argument('--client')
        parser.add_argument('--since')
    parser.add_argument('--json', action='store_true')
    options = parser.parse_args(argv)
    if command == 'list':
        if options.client is not None and \
                not webjob.is_client_id(options.client):
            raise webjob.UsageError('--client: not a valid client id')
        options.since = parse_since(options.since) if options.since else None
    return options


def parse_install_args(argv):
    """The install-cgi options: PATH is a file name, never an option."""
    parser = make_parser('install-cgi')
    parser.add_argument('path', metavar='PATH')
    parser.add_argument('--config')
    parser.add_argument('--force', action='store_true')
    return parser.parse_args(argv)


def run_locker_tool(command, argv):
    """verify: 0 when every group is whole, 1 when anything is wrong.
    list: 0."""
    options = parse_locker_args(command, argv)
    base = resolve_base(options)
    if command == 'verify':
        return 1 if verify_locker(base, sys.stdout, options.json) else 0
    list_jobs(base, sys.stdout, options.client, options.since, options.json)
    return 0


def parse_fleet_args(command, argv):
    """The job, hunt and report options: 'job add|list|cancel', 'hunt
    start|status|cancel|list', 'report'."""
    import argparse  # late import: start-up time
    import time  # late import: tools only

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise webjob.UsageError('%s: %s' % (self.prog, message))

    actions = {'job': ('add', 'list', 'cancel'),
               'hunt': ('start', 'status', 'cancel', 'list'),
               'report': ('',)}[command]
    action = argv[0] if argv[:1] and argv[0] in actions else ''
    if action not in actions:
        raise webjob.UsageError('%s: expected %s' % (command, ' or '.join(
            actions)))
    parser = Parser(prog=('nph_webjob.py %s %s' % (command, action)).strip(),
                    add_help=False)
    parser.add_argument('--root')
    parser.add_argument('--config')
    if action in ('add', 'start'):
        parser.add_argument('--command', required=True)
        parser.add_argument('--alias')
        parser.add_argument('--args')
        parser.add_argument('--comment')
        parser.add_argument('--priority', type=int, default=DEFAULT_PRIORITY)
        parser.add_argument('--expires')
        parser.add_argument('--pin', action='store_true')
        for key, name, size in PIN_KEYS:
            parser.add_argument('--' + name.lower())
        parser.add_argument('--clients', '--client')
    if action == 'start':
        parser.add_argument('name')
        parser.add_argument('--pattern')
        parser.add_argument('--group')
        parser.add_argument('--rate', type=int, default=0)
    if action in ('status', 'cancel') and command == 'hunt':
        parser.add_argument('name')
    if action == 'cancel' and command == 'job':
        parser.add_argument('entries', nargs='+')
    if action in ('list', 'status', ''):
        parser.add_argument('--json', action='store_true')
    if command == 'job' and action == 'list' or command == 'report':
        parser.add_argument('--client')
    if command == 'report':
        parser.add_argument('--since')
        parser.add_argument('--html')
    options = parser.parse_args(argv[1:] if action else argv)
    options.action, options.now = action, time.time()
    if getattr(options, 'client', None) is not None and \
            not webjob.is_client_id(options.client):
        raise webjob.UsageError('--client: not a valid client id')
    if getattr(options, 'expires', None) is not None:
        options.expires = parse_expiry(options.expires, options.now)
    if getattr(options, 'since', None):
        options.since = parse_since(options.since)
    if getattr(options, 'rate', 0) < 0 or \
            getattr(options, 'priority', 0) < 0:
        raise webjob.UsageError('--rate and --priority: expected 0 or more')
    return options


def run_fleet_tool(command, argv, out):
    """job, hunt and report; the exit codes their functions give."""
    options = parse_fleet_args(command, argv)
    base = resolve_base(options)
    limit = resolve_hand_out_limit(options)
    now, action = options.now, options.action
    try:
        if command == 'report':
            report = build_report(base, options.client, options.since)
            if options.html:
                write_html_report(report, base, options.html)
            return 1 if write_report(report, out, options.json) else 0
        if command == 'job' and action == 'add':
            clients = select_clients(base, options)
            for name in queue_jobs(base, options, clients, now):
                out.write('%s: queued\n' % name)
            return 0
        if command == 'job' and action == 'list':
            list_queue(base, out, options.client, options.json, now, limit)
            return 0
        if command == 'job':
            return cancel_entries(base, options.entries, out, now)
        if action == 'start':
            return start_hunt(base, options, out, now)
        if action == 'status':
            return show_hunt(base, options.name, out, options.json, now,
                             limit)
        if action == 'cancel':
            return cancel_hunt(base, options.name, out, now)
        for name in hunt_names(base):
            show_hunt(base, name, out, options.json, now, limit) \
                if options.json else out.write('%s\n' % name)
        return 0
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise webjob.WebJobError('%s: %s' % (exc.filename or base,
                                             exc.strerror or exc))


def resolve_hand_out_limit(options):
    """JobHandOutTimeLimit of --config (or the CGI's), else the default."""
    path = options.config or os.environ.get(CONFIG_VARIABLE)
    if not path:
        return dict((n, d) for n, k, d in SERVER_CONTROLS)[
            'JobHandOutTimeLimit']
    try:
        return load_site(path, True).values['JobHandOutTimeLimit']
    except HTTPStatusError as exc:
        raise webjob.WebJobError(exc.message)


def main(argv=None):
    """CGI when GATEWAY_INTERFACE is set, else the command line; exit code.

    Under CGI the arguments are ignored: a web server turns a query without
    '=' into arguments, and a hostile one must still get an HTTP answer.
    """
    cgi = bool(os.environ.get('GATEWAY_INTERFACE')) and argv is None
    invoked = os.path.basename(sys.argv[0] if sys.argv else '')
    argv = sys.argv[1:] if argv is None else argv
    command = None
    try:
        if cgi:
            return run_cgi()
        if invoked.startswith('webjob-dsvtool'):
            return dsvtool_main(argv)
        if argv[:1] == ['dsvtool']:
            return dsvtool_main(argv[1:])
        if argv[:1] in (['-h'], ['--help']):
            sys.stdout.write(USAGE)
            return 0
        command = argv[0] if argv else None
        if help_request(argv):
            raise HelpRequested(help_request(argv))
        if argv[:1] in (['verify'], ['list']):
            return run_locker_tool(argv[0], argv[1:])
        if argv[:1] in (['job'], ['hunt'], ['report']):
            return run_fleet_tool(argv[0], argv[1:], sys.stdout)
        if argv == [SUPERVISE_COMMAND]:
            return run_trigger_supervisor(sys.stdin.buffer)
        if argv[:1] == ['install-cgi']:
            options = parse_install_args(argv[1:])
            return install_cgi(options.path, options.config, options.force)
        if argv[:1] != ['serve']:
            command = None
            raise webjob.UsageError('expected "serve", "verify", "list", '
                                    '"job", "hunt", "report", '
                                    '"install-cgi", "dsvtool" or -h'
                                    if argv else
                                    'not a CGI request (GATEWAY_INTERFACE '
                                    'is unset) and no command given')
        options = parse_serve_args(argv[1:])
        return serve(options.root, options.bind, options.port, options.config,
                     options.tls_cert, options.tls_key, options.client_ca,
                     options.htpasswd, options.force, options.admins,
                     options.init, options.server_id)
    except HelpRequested as exc:
        sys.stdout.write(command_usage(exc.args[0]))
        return 0
    except webjob.UsageError as exc:
        write_stderr(exc)
        sys.stderr.write(command_usage(command))
        return 2
    except webjob.WebJobError as exc:
        write_stderr(exc)
        return 1
    except BrokenPipeError:     # 'list | head': the reader went away
        write_stderr('stdout: the reader went away (broken pipe)')
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        write_stderr('interrupted')
        return 130
    except Exception as exc:    # last resort: one line, never a traceback
        write_stderr('internal error: %s: %s (please report it, with the '
                     'command line)' % (type(exc).__name__, exc))
        return 1


if __name__ == '__main__':
    sys.exit(main())
