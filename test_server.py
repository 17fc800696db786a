"""Tests for nph_webjob.py, in the order of its sections.

The handler is driven in-process (an environ dict and BytesIO streams), the
CGI as a real subprocess with a CGI environment, the standalone server and
real Apache over loopback sockets with requests built byte for byte as
webjob.py sends them.  Fixtures live in conftest.py.
"""

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import nph_webjob
from conftest import (CGI_PATH, LOOPBACK, NEWEST_PY, NPH_WEBJOB, OLDEST_PY,
                      PARSED_CGI_PATH, WEBJOB, free_port, read_log_lines,
                      wait_for_lines, wait_for_port, write_file)

VERSION = 'webjob+1.0.0+ssl+dsv+64+bit'
SYSTEM = 'x86_64+Linux+6.18.0-1-amd64'
ENV_RECORD = b'Version=webjob 1.0.0 ssl dsv 64 bit\nJid=x\n'
ARTICLE_EPOCH = 1085355126          # 2004-05-23 16:32:06 PDT (the article)

#: One log line: DateTime (two tokens), ten single-token fields, '--', text.
LOG_LINE = re.compile(
    r'(?P<date>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?P<job_id>\S+) (?P<user>\S+) '
    r'(?P<addr>\S+) (?P<method>\S+) (?P<client_id>\S+) (?P<filename>\S+) '
    r'(?P<length>\S+) (?P<server_length>\d+) (?P<duration>\d+) '
    r'(?P<status>\d{3}) --(?: (?P<message>[ -~]*))?\Z')
JOB_ID = re.compile(r'server_1_\d{10}_\d{5}\Z')
GROUP = re.compile(r'client_1_\d{14}_\d{5}_hostname\.sh\.(out|err|env|rdy)\Z')


def query(clientid='client_1', filename='hostname.sh', runtype='snapshot',
          lengths=None):
    """A query string as webjob.py escapes it (GET, or PUT with lengths)."""
    text = 'VERSION=%s&SYSTEM=%s&CLIENTID=%s&FILENAME=%s&RUNTYPE=%s' % (
        VERSION, SYSTEM, clientid, filename, runtype)
    if lengths is not None:
        text += '&STDOUT_LENGTH=%d&STDERR_LENGTH=%d&STDENV_LENGTH=%d' % lengths
    return text


def put_query(out, err, env, **kwargs):
    return query(lengths=(len(out), len(err), len(env)), **kwargs)


def client_request(method, port, query_string, body=b'', job_id=None,
                   auth=None, path=CGI_PATH, close=True):
    """The request bytes exactly as webjob.py writes them."""
    lines = ['%s %s?%s HTTP/1.1' % (method, path, query_string),
             'Host: %s:%d' % (LOOPBACK, port),
             'Content-Type: application/octet-stream',
             'Content-Length: %d' % len(body)]
    if auth:
        lines.append('Authorization: Basic %s' % base64.b64encode(
            ('%s:%s' % auth).encode()).decode())
    if job_id:
        lines.append('Job-Id: %s' % job_id)
    if close:
        lines.append('Connection: close')
    return ('\r\n'.join(lines) + '\r\n\r\n').encode() + body


class Reply(object):
    """A parsed HTTP response (or CGI output)."""

    def __init__(self, status_line, fields, body):
        self.status_line = status_line
        self.fields = fields
        self.body = body
        self.status = int(status_line.split()[1])

    def field(self, name):
        values = [v for k, v in self.fields if k.lower() == name.lower()]
        assert len(values) <= 1, (name, self.fields)
        return values[0] if values else None


def read_reply(reader):
    """Read one response with a Content-Length body from a binary reader."""
    status_line = reader.readline().decode('latin-1').rstrip('\r\n')
    fields = []
    while True:
        line = reader.readline()
        if line in (b'\r\n', b'\n', b''):
            break
        name, _, value = line.decode('latin-1').partition(':')
        fields.append((name, value.strip()))
    reply = Reply(status_line, fields, b'')
    reply.body = reader.read(int(reply.field('Content-Length') or 0))
    return reply


def parse_raw(data):
    return read_reply(io.BytesIO(data))


def send(port, data):
    """One request on a new connection; the reply."""
    with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
        sock.sendall(data)
        return read_reply(sock.makefile('rb'))


def make_site(root, next_serial=None, clock=None, **values):
    """A Site on root; RequireUser=N unless given."""
    overrides = dict(BaseDirectory=str(root), RequireUser=False)
    overrides.update(values)
    return nph_webjob.load_site(None, overrides=overrides,
                                next_serial=next_serial, clock=clock)


def call(site, method='GET', query_string=None, body=b'', nph=True,
         stdin=None, **environ):
    """Run one request through handle_request; (status, Reply)."""
    env = {'REQUEST_METHOD': method, 'REMOTE_ADDR': '192.0.2.7',
           'QUERY_STRING': query() if query_string is None else query_string,
           'CONTENT_LENGTH': str(len(body))}
    env.update(environ)
    env = dict((k, v) for k, v in env.items() if v is not None)
    out = io.BytesIO()
    status = nph_webjob.handle_request(env, stdin or io.BytesIO(body), out,
                                       site, nph)
    return status, parse_raw(out.getvalue())


def put(site, out=b'hello\n', err=b'', env=ENV_RECORD, **environ):
    body = out + err + env
    return call(site, 'PUT', put_query(out, err, env), body, **environ)


def incoming(root):
    return sorted(os.listdir(os.path.join(str(root), 'incoming')))


def tree(root):
    """Every path under root, except the log (which a request always adds)
    and a standalone server's serial file (which serve always keeps)."""
    found = set()
    for folder, subs, files in os.walk(str(root)):
        for name in subs + files:
            if not name.startswith('nph-webjob-serial.'):
                found.add(os.path.relpath(os.path.join(folder, name),
                                          str(root)))
    found.discard(os.path.join('logfiles', 'nph-webjob.log'))
    return found


def last_log(root):
    lines = read_log_lines(root)
    assert lines, 'no log line'
    match = LOG_LINE.match(lines[-1])
    assert match, lines[-1]
    return match


# Constants ###################################################################

def test_status_table_is_the_nph_ftimes_table():
    """Plus 401, which only the standalone server's own Basic auth sends,
    252, which only the JOB extension (JobQueueEnable=Y) sends, and the
    delivery extension's 253 (a re-send) and 503 (its first copy is still
    being stored)."""
    assert nph_webjob.STATUS_REASONS == {
        200: 'OK', 204: 'No Content', 251: 'Link Test OK',
        252: 'No Job Queued', 253: 'Upload Already Stored',
        401: 'Unauthorized', 404: 'Not Found',
        405: 'Method Not Allowed', 409: 'Conflict', 450: 'Invalid Query',
        451: 'File Already Exists', 452: 'Username Undefined',
        453: 'Username-ClientId Mismatch', 454: 'Content-Length Undefined',
        455: 'Content-Length Exceeds Limit', 456: 'Content-Length Mismatch',
        457: 'File Not Available', 500: 'Internal Server Error',
        503: 'Service Unavailable',
        550: 'Internal Server Initialization Error'}


def test_controls_table_holds_the_defaults():
    table = dict((name, default) for name, kind, default
                 in nph_webjob.SERVER_CONTROLS)
    assert table == {'BaseDirectory': '/var/webjob', 'RequireUser': True,
                     'RequireMatch': True, 'CapContentLength': False,
                     'MaxContentLength': 100000000, 'EnableLogging': True,
                     'UseGMT': False, 'ServerId': 'server_1',
                     'JobQueueEnable': False, 'JobHandOutTimeLimit': 3600,
                     'GetHookCommandLine': '', 'GetHookEnable': False,
                     'GetHookSuffix': '', 'GetHookTimeLimit': 60,
                     'GetTriggerCommandLine': '', 'GetTriggerEnable': False,
                     'IntegrityEnable': True, 'OverrideDirectory': '',
                     'PutTriggerCommandLine': '', 'PutTriggerEnable': False,
                     'TriggerTimeLimit': 600, 'PartialUploadEnable': False,
                     'PartialExpireTime': 604800}


# Config ######################################################################

@pytest.mark.parametrize('text, words', [
    ('Bogus = 1\n', 'Bogus'),
    ('RequireUser = maybe\n', 'RequireUser'),
    ('MaxContentLength = -5\n', 'MaxContentLength'),
    ('ServerId = server one\n', 'ServerId'),
    ('ServerId = server.1\n', 'ServerId'),
    ('BaseDirectory = relative/dir\n', 'BaseDirectory'),
    ('no equals sign\n', ':2:'),
])
def test_bad_config_is_550_naming_the_control(tmp_path, server_root, capfd,
                                              text, words):
    cfg = write_file(tmp_path / 'nph-webjob.cfg',
                     ('BaseDirectory = %s\n' % server_root + text).encode())
    status, reply = call(None, WEBJOB_PROPERTIES_FILE=str(cfg))
    assert (status, reply.status_line) == (
        550, 'HTTP/1.1 550 Internal Server Initialization Error')
    assert reply.body == b''
    err = capfd.readouterr().err
    assert words in err and str(cfg) in err and 'Traceback' not in err
    assert read_log_lines(server_root) == []     # config unknown: stderr only


def test_named_config_file_that_is_missing_is_550(tmp_path, capfd):
    status, _ = call(None, WEBJOB_PROPERTIES_FILE=str(tmp_path / 'none.cfg'))
    assert status == 550
    assert 'none.cfg' in capfd.readouterr().err


def test_config_cannot_be_standard_input(capfd):
    status, _ = call(None, WEBJOB_PROPERTIES_FILE='-')
    assert status == 550


def test_without_config_variable_the_defaults_apply(capfd):
    status, _ = call(None)
    # /var/webjob does not exist here: the default BaseDirectory was used.
    assert status == 550
    assert '/var/webjob/' in capfd.readouterr().err


def test_config_file_sets_server_controls(tmp_path, server_root):
    cfg = write_file(tmp_path / 'nph-webjob.cfg', (
        'basedirectory = %s   # case-insensitive controls\n'
        'ServerId = lab-7_a\nRequireUser = N\n' % server_root).encode())
    status, reply = call(None, WEBJOB_PROPERTIES_FILE=str(cfg))
    assert status == 200
    assert re.match(r'lab-7_a_\d+_\d{5}\Z', reply.field('Job-Id'))


@pytest.mark.parametrize('missing', ['incoming', 'logfiles', 'profiles', ''])
def test_missing_layout_folder_is_550(server_root, capfd, missing):
    import shutil
    shutil.rmtree(os.path.join(str(server_root), missing))
    status, reply = call(make_site(server_root))
    assert status == 550 and reply.body == b''
    if missing in ('incoming', 'profiles'):
        assert missing in last_log(server_root).group('message')
    else:                       # no log folder: the line goes to stderr
        assert ' 550 -- Directory' in capfd.readouterr().err


# Request validation ##########################################################

HOSTILE_QUERIES = [
    query(filename='..'),
    query(filename='../../etc/passwd'),
    query(filename='..%2f..%2fetc%2fpasswd'),
    query(filename='%2e%2e%2fprofiles%2fcommon%2fcommands%2fcommon.sh'),
    query(filename='sub/hostname.sh'),
    query(filename='hostname.sh%00.txt'),
    query(filename='.hidden'),
    query(filename='-rf'),
    query(filename='a' * 256),
    query(clientid='..'),
    query(clientid='%2e%2e'),
    query(clientid='client_1%2f..%2fcommon'),
    query(clientid='/etc'),
    query(clientid='c' * 65),
    query(clientid=''),
    query() + '&FILENAME=hostname.sh',
    query() + '&EXTRA=1',
    query().replace('&RUNTYPE=snapshot', ''),
    query().replace('FILENAME=', 'filename='),
    query() + '&',
    query() + '&FILENAME',
    query(filename='host%zz.sh'),
    query(filename='host%4'),
    query(filename='host%ff.sh'),
    query(runtype='baseline'),
    query().replace(VERSION, 'ftimes+3.13.0'),
    query().replace(VERSION, 'webjob+' + 'x' * 70),
    query().replace(SYSTEM, 'Linux%0a2004-01-01+forged'),
    query() + '&STDOUT_LENGTH=1&STDERR_LENGTH=0&STDENV_LENGTH=0',
    query() + '&x=' + 'y' * 5000,
    '',
]


@pytest.mark.parametrize('bad', HOSTILE_QUERIES)
def test_hostile_get_query_is_450_and_writes_nothing(server_root, bad):
    before = tree(server_root)
    status, reply = call(make_site(server_root), query_string=bad)
    assert (status, reply.status_line) == (450, 'HTTP/1.1 450 Invalid Query')
    assert reply.body == b'' and reply.field('Content-Length') == '0'
    assert tree(server_root) == before
    entry = last_log(server_root)
    assert (entry.group('client_id'), entry.group('filename')) == ('-', '-')


@pytest.mark.parametrize('bad', HOSTILE_QUERIES[:-3] + [
    put_query(b'x', b'', b'').replace('STDOUT_LENGTH=1', 'STDOUT_LENGTH=-1'),
    put_query(b'x', b'', b'').replace('STDOUT_LENGTH=1', 'STDOUT_LENGTH=1e0'),
    put_query(b'x', b'', b'').replace('STDOUT_LENGTH=1', 'STDOUT_LENGTH=' +
                                      '0' * 20 + '1'),
    put_query(b'x', b'', b'').replace('&STDENV_LENGTH=0', ''),
])
def test_hostile_put_query_is_450_and_writes_nothing(server_root, bad):
    if 'STDOUT_LENGTH' not in bad:
        bad += '&STDOUT_LENGTH=1&STDERR_LENGTH=0&STDENV_LENGTH=0'
    before = tree(server_root)
    status, _ = call(make_site(server_root), 'PUT', bad, b'x')
    assert status == 450
    assert tree(server_root) == before


def test_query_parameters_may_come_in_any_order(server_root):
    reordered = '&'.join(reversed(query().split('&')))
    assert call(make_site(server_root), query_string=reordered)[0] == 200


def test_query_values_are_unescaped_like_httpescape(server_root):
    write_file(server_root / 'profiles/client_1/commands/c++.sh', b'cpp')
    status, reply = call(make_site(server_root),
                         query_string=query(filename='c%2b%2b.sh'))
    assert (status, reply.body) == (200, b'cpp')
    assert last_log(server_root).group('filename') == 'c++.sh'


# GET #########################################################################

def test_get_serves_the_client_program_with_a_job_id(server_root):
    status, reply = call(make_site(server_root))
    assert reply.status_line == 'HTTP/1.1 200 OK'
    assert reply.body == b'#!/bin/sh\necho "hello from client_1 $*"\n'
    assert reply.field('Content-Type') == 'application/octet-stream'
    assert reply.field('Content-Length') == str(len(reply.body))
    assert JOB_ID.match(reply.field('Job-Id'))
    assert reply.field('WebJob-Payload-Signature') is None


def test_get_falls_back_to_the_common_profile(server_root):
    status, reply = call(make_site(server_root),
                         query_string=query(filename='common.sh'))
    assert (status, reply.body) == (200, b'#!/bin/sh\necho "hello from '
                                         b'common $*"\n')


def test_client_profile_wins_over_common(server_root):
    write_file(server_root / 'profiles/common/commands/hostname.sh', b'common')
    reply = call(make_site(server_root))[1]
    assert reply.body.startswith(b'#!/bin/sh\necho "hello from client')


def test_client_without_a_profile_gets_common(server_root):
    status, reply = call(make_site(server_root), query_string=query(
        clientid='client_9', filename='common.sh'))
    assert (status, reply.body) == (200, b'#!/bin/sh\necho "hello from '
                                         b'common $*"\n')


def test_unknown_program_is_404(server_root):
    status, reply = call(make_site(server_root),
                         query_string=query(filename='nothing.sh'))
    assert (status, reply.status_line, reply.body) == (
        404, 'HTTP/1.1 404 Not Found', b'')
    assert 'profiles/client_1/commands/nothing.sh' in \
        last_log(server_root).group('message')


def test_program_that_cannot_be_opened_is_457(server_root):
    os.mkdir(str(server_root / 'profiles/client_1/commands/dir.sh'))
    write_file(server_root / 'profiles/common/commands/dir.sh', b'common')
    status, reply = call(make_site(server_root),
                         query_string=query(filename='dir.sh'))
    assert (status, reply.status_line) == (457,
                                           'HTTP/1.1 457 File Not Available')


def test_signature_file_is_sent_as_a_header(server_root):
    signature = base64.b64encode(os.urandom(140)).decode()
    write_file(server_root / 'profiles/client_1/commands/hostname.sh.sig',
               ('\n%s\n\n' % signature).encode())
    reply = call(make_site(server_root))[1]
    assert reply.field('WebJob-Payload-Signature') == signature


@pytest.mark.parametrize('content', [
    base64.b64encode(os.urandom(192)) + b'\n',       # 256 characters
    b'AAAA\nBBBB\n', b'not base64!\n', b'', b'\n'])
def test_malformed_signature_file_sends_no_header(server_root, content):
    write_file(server_root / 'profiles/client_1/commands/hostname.sh.sig',
               content)
    status, reply = call(make_site(server_root))
    assert status == 200 and reply.field('WebJob-Payload-Signature') is None


def test_signature_file_is_served_by_a_plain_get(server_root):
    write_file(server_root / 'profiles/common/commands/common.sh.sig',
               b'c2lnbmF0dXJl\n')
    reply = call(make_site(server_root),
                 query_string=query(filename='common.sh.sig'))[1]
    assert reply.body == b'c2lnbmF0dXJl\n'


# PUT #########################################################################

def test_put_stores_a_group_of_four_files(server_root):
    job_id = 'server_1_1700000000_00042'
    status, reply = put(make_site(server_root), b'out\n', b'err\n', ENV_RECORD,
                        HTTP_JOB_ID=job_id)
    assert (status, reply.status_line, reply.body) == (200, 'HTTP/1.1 200 OK',
                                                       b'')
    names = incoming(server_root)
    assert len(names) == 4 and all(GROUP.match(n) for n in names), names
    group = os.path.join(str(server_root), 'incoming', names[0][:-4])
    contents = dict((ext, open(group + '.' + ext, 'rb').read())
                    for ext in ('out', 'err', 'env', 'rdy'))
    assert contents == {'out': b'out\n', 'err': b'err\n', 'env': ENV_RECORD,
                        'rdy': ('Jid=%s\n' % job_id).encode()}


def test_group_name_and_log_match_the_article(server_root, local_tz):
    local_tz('PST8PDT')
    root = server_root
    os.makedirs(str(root / 'profiles/client1/commands'))
    write_file(root / 'profiles/client1/commands/host.sh',
               b'#!/bin/sh\nhostname\n')
    serials = iter([723, 724])
    clock = iter([ARTICLE_EPOCH, ARTICLE_EPOCH, ARTICLE_EPOCH + 4,
                  ARTICLE_EPOCH + 4])
    site = make_site(root, next_serial=lambda: next(serials),
                     clock=lambda: next(clock), RequireUser=True)
    user = dict(REMOTE_USER='client1', REMOTE_ADDR='192.168.1.120')
    status, reply = call(site, query_string=query('client1', 'host.sh'),
                         **user)
    job_id = reply.field('Job-Id')
    assert job_id == 'server_1_1085355126_00723'
    out, env = b'x' * 18, b'e' * 606
    status, _ = call(site, 'PUT', query('client1', 'host.sh', lengths=(18, 0,
                                                                       606)),
                     out + env, HTTP_JOB_ID=job_id, **user)
    assert status == 200
    assert incoming(root) == ['client1_20040523163210_00724_host.sh.' + ext
                              for ext in ('env', 'err', 'out', 'rdy')]
    rdy = root / 'incoming/client1_20040523163210_00724_host.sh.rdy'
    assert rdy.read_bytes() == b'Jid=server_1_1085355126_00723\n'
    assert len(rdy.read_bytes()) == 30                  # the article's size
    assert read_log_lines(root) == [
        '2004-05-23 16:32:06 server_1_1085355126_00723 client1 192.168.1.120 '
        'GET client1 host.sh 0 19 0 200 -- Success',
        '2004-05-23 16:32:10 server_1_1085355126_00723 client1 192.168.1.120 '
        'PUT client1 host.sh 624 0 0 200 -- Success']


def test_use_gmt_stamps_groups_and_log_in_gmt(server_root, local_tz):
    local_tz('PST8PDT')
    site = make_site(server_root, clock=lambda: ARTICLE_EPOCH, UseGMT=True)
    put(site)
    assert incoming(server_root)[0].startswith('client_1_20040523233206_')
    assert last_log(server_root).group('date') == '2004-05-23 23:32:06'


def test_put_without_job_id_header_gets_a_new_one(server_root):
    put(make_site(server_root))
    rdy = [n for n in incoming(server_root) if n.endswith('.rdy')][0]
    text = (server_root / 'incoming' / rdy).read_text()
    assert re.match(r'Jid=server_1_\d{10}_\d{5}\n\Z', text)


@pytest.mark.parametrize('header', ['bad id', 'a/b', 'x' * 256, 'a\tb'])
def test_put_with_an_unsafe_job_id_header_gets_a_new_one(server_root, header):
    status, reply = put(make_site(server_root), HTTP_JOB_ID=header)
    assert status == 200 and JOB_ID.match(reply.field('Job-Id'))


def test_existing_group_is_never_overwritten(server_root):
    site = make_site(server_root, next_serial=lambda: 7,
                     clock=lambda: ARTICLE_EPOCH, UseGMT=True)
    put(site, out=b'first\n')
    put(site, out=b'second\n')
    names = incoming(server_root)
    assert [n for n in names if n.endswith('.out')] == [
        'client_1_20040523233206_00007_hostname.sh.out',
        'client_1_20040523233206_00008_hostname.sh.out']
    assert (server_root / 'incoming' / names[2]).read_bytes() == b'first\n'
    assert len(names) == 8


def test_stale_lock_file_makes_the_upload_take_the_next_number(server_root):
    site = make_site(server_root, next_serial=lambda: 99999,
                     clock=lambda: ARTICLE_EPOCH, UseGMT=True)
    stale = server_root / 'incoming' / (
        'client_1_20040523233206_99999_hostname.sh.lck')
    write_file(stale, b'')
    assert put(site)[0] == 200
    assert 'client_1_20040523233206_00000_hostname.sh.rdy' in \
        incoming(server_root)
    assert stale.exists()


def test_every_group_name_taken_is_451(server_root, monkeypatch):
    monkeypatch.setattr(nph_webjob, 'SERIAL_MODULUS', 2)  # a 2-number space
    site = make_site(server_root, next_serial=lambda: 0,
                     clock=lambda: ARTICLE_EPOCH, UseGMT=True)
    assert put(site)[0] == 200 and put(site)[0] == 200
    before = incoming(server_root)
    status, reply = put(site)
    assert (status, reply.status_line) == (
        451, 'HTTP/1.1 451 File Already Exists')
    assert incoming(server_root) == before


def test_linktest_discards_the_body_with_251(server_root):
    body = b'o' * 10 + b'e' * 5
    status, reply = call(make_site(server_root), 'PUT', query(
        runtype='linktest', lengths=(10, 5, 0)), body)
    assert (status, reply.status_line) == (251, 'HTTP/1.1 251 Link Test OK')
    assert incoming(server_root) == []


def test_put_without_content_length_is_454(server_root):
    status, reply = call(make_site(server_root), 'PUT',
                         put_query(b'', b'', b''), CONTENT_LENGTH=None)
    assert (status, reply.status_line) == (
        454, 'HTTP/1.1 454 Content-Length Undefined')


def test_get_without_content_length_is_served(server_root):
    assert call(make_site(server_root), CONTENT_LENGTH=None)[0] == 200


def test_upload_over_the_cap_is_455(server_root):
    site = make_site(server_root, CapContentLength=True, MaxContentLength=10)
    status, reply = put(site, out=b'x' * 11, env=b'')
    assert (status, reply.status_line) == (
        455, 'HTTP/1.1 455 Content-Length Exceeds Limit')
    assert put(site, out=b'x' * 10, env=b'')[0] == 200


def test_cap_applies_only_when_enabled(server_root):
    site = make_site(server_root, MaxContentLength=10)
    assert put(site, out=b'x' * 100)[0] == 200


def test_content_length_not_the_sum_of_lengths_is_456(server_root):
    status, reply = call(make_site(server_root), 'PUT', query(
        lengths=(3, 0, 0)), b'four')
    assert (status, reply.status_line) == (
        456, 'HTTP/1.1 456 Content-Length Mismatch')
    assert incoming(server_root) == []


def test_short_body_is_456_and_leaves_no_files(server_root):
    status, reply = call(make_site(server_root), 'PUT', query(
        lengths=(4, 4, 4)), b'out\nerr\n', CONTENT_LENGTH='12')
    assert status == 456
    assert incoming(server_root) == []


def test_missing_remote_user_is_452(server_root):
    status, reply = call(make_site(server_root, RequireUser=True))
    assert (status, reply.status_line) == (
        452, 'HTTP/1.1 452 Username Undefined')


@pytest.mark.parametrize('user', ['client_2', 'Client_1', 'client_1 ',
                                  'client'])
def test_remote_user_must_equal_client_id_exactly_453(server_root, user):
    site = make_site(server_root, RequireUser=True)
    status, reply = call(site, REMOTE_USER=user)
    assert (status, reply.status_line) == (
        453, 'HTTP/1.1 453 Username-ClientId Mismatch')
    status, _ = put(site, REMOTE_USER=user)
    assert status == 453 and incoming(server_root) == []


def test_matching_remote_user_is_served(server_root):
    site = make_site(server_root, RequireUser=True)
    assert call(site, REMOTE_USER='client_1')[0] == 200
    assert last_log(server_root).group('user') == 'client_1'


def test_verified_certificate_cn_is_the_user_without_basic_auth(server_root):
    """mod_ssl with SSLVerifyClient require and SSLOptions +StdEnvVars."""
    site = make_site(server_root, RequireUser=True)
    status, _ = call(site, SSL_CLIENT_VERIFY='SUCCESS',
                     SSL_CLIENT_S_DN_CN='client_1')
    assert status == 200
    assert last_log(server_root).group('user') == 'client_1'
    status, _ = call(site, SSL_CLIENT_VERIFY='SUCCESS',
                     SSL_CLIENT_S_DN_CN='client_2')
    assert status == 453


@pytest.mark.parametrize('verify', [None, 'NONE', 'FAILED:unknown ca',
                                    'GENEROUS'])
def test_unverified_certificate_cn_is_not_a_user(server_root, verify):
    site = make_site(server_root, RequireUser=True)
    status, _ = call(site, SSL_CLIENT_VERIFY=verify,
                     SSL_CLIENT_S_DN_CN='client_1')
    assert status == 452


def test_basic_user_wins_over_certificate_cn(server_root):
    site = make_site(server_root, RequireUser=True)
    status, _ = call(site, REMOTE_USER='client_2', SSL_CLIENT_VERIFY='SUCCESS',
                     SSL_CLIENT_S_DN_CN='client_1')
    assert status == 453


def test_require_match_off_lets_any_user_in(server_root):
    site = make_site(server_root, RequireUser=True, RequireMatch=False)
    assert call(site, REMOTE_USER='client_2')[0] == 200


def test_require_user_off_disables_require_match(server_root):
    site = make_site(server_root, RequireUser=False, RequireMatch=True)
    assert call(site, REMOTE_USER='client_2')[0] == 200


@pytest.mark.parametrize('method', ['POST', 'DELETE', 'HEAD', 'JOB', 'get'])
def test_other_methods_are_405(server_root, method):
    status, reply = call(make_site(server_root), method)
    assert (status, reply.status_line, reply.body) == (
        405, 'HTTP/1.1 405 Method Not Allowed', b'')
    assert last_log(server_root).group('method') == method


def test_a_folder_under_a_temporary_name_is_passed_by(server_root):
    """Nothing is refused (or written into) because of what sits under a
    group's temporary name: the upload takes the next serial number.  (A
    write that fails is a 500 that removes the group: the disk-full tests
    of test_server_locker.py.)"""
    site = make_site(server_root, next_serial=lambda: 5,
                     clock=lambda: ARTICLE_EPOCH, UseGMT=True)
    blocker = server_root / 'incoming' / (
        '.client_1_20040523233206_00005_hostname.sh.err')
    os.mkdir(str(blocker))
    status, reply = put(site)
    assert (status, reply.status_line) == (200, 'HTTP/1.1 200 OK')
    assert [name for name in incoming(server_root) if name.endswith('.rdy')
            ] == ['client_1_20040523233206_00006_hostname.sh.rdy']
    assert blocker.is_dir() and not os.listdir(str(blocker))


def test_unexpected_exception_is_500_without_a_traceback(server_root):
    closed = io.BytesIO(b'x')
    closed.close()
    status, reply = call(make_site(server_root), 'PUT',
                         put_query(b'x', b'', b''), b'x', stdin=closed)
    assert (status, reply.body) == (500, b'')
    assert 'ValueError' in last_log(server_root).group('message')
    assert incoming(server_root) == []


def test_answers_other_than_get_200_have_an_empty_body(server_root):
    for status, reply in (put(make_site(server_root)),
                          call(make_site(server_root), 'DELETE')):
        assert reply.field('Content-Length') == '0' and reply.body == b''


def test_parsed_header_mode_writes_a_status_field(server_root):
    out = io.BytesIO()
    nph_webjob.handle_request({'REQUEST_METHOD': 'GET', 'QUERY_STRING':
                               query(filename='none.sh')}, io.BytesIO(), out,
                              make_site(server_root), nph=False)
    assert out.getvalue().startswith(b'Status: 404 Not Found\r\n')


# Logging #####################################################################

def test_log_line_has_the_twelve_fields(server_root):
    call(make_site(server_root), REMOTE_USER='client_1')
    entry = last_log(server_root)
    assert entry.group('user', 'addr', 'method', 'client_id', 'filename',
                       'length', 'duration', 'status', 'message') == (
        'client_1', '192.0.2.7', 'GET', 'client_1', 'hostname.sh', '0', '0',
        '200', 'Success')
    assert JOB_ID.match(entry.group('job_id'))
    assert int(entry.group('server_length')) == 40
    assert read_log_lines(server_root)[-1].count(' ') == 13


def test_empty_log_fields_are_dashes(server_root):
    call(make_site(server_root), 'DELETE', '', REMOTE_USER=None,
         REMOTE_ADDR=None, CONTENT_LENGTH=None)
    entry = last_log(server_root)
    assert entry.group('job_id', 'user', 'addr', 'client_id', 'filename',
                       'length') == ('-',) * 6


def test_client_controlled_log_fields_cannot_forge_lines(server_root):
    call(make_site(server_root), 'G E\nT', REMOTE_USER='evil user\n2004 x',
         CONTENT_LENGTH='1 2')
    lines = read_log_lines(server_root)
    assert len(lines) == 1
    entry = LOG_LINE.match(lines[0])
    assert entry and entry.group('method') == 'G\\x20E\\x0aT'
    assert entry.group('user') == 'evil\\x20user\\x0a2004\\x20x'


def test_enable_logging_off_writes_no_log(server_root):
    call(make_site(server_root, EnableLogging=False))
    assert read_log_lines(server_root) == []


def test_unopenable_log_goes_to_stderr(server_root, capfd):
    os.mkdir(str(server_root / 'logfiles/nph-webjob.log'))
    assert call(make_site(server_root))[0] == 200
    err = capfd.readouterr().err
    assert 'log unavailable:' in err and 'GET client_1 hostname.sh' in err


def test_concurrent_log_appends_stay_whole(tmp_path):
    path = str(tmp_path / 'log')
    line = 'x' * 3000 + '\n'

    def writer():
        for _ in range(100):
            assert nph_webjob.append_log(path, line)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with open(path) as log:
        assert log.read().splitlines() == [line[:-1]] * 800


# CGI front end ###############################################################

def run_cgi(tmp_path, name, environ, body=b'', python=None, args=(),
            umask=None):
    """Run nph_webjob.py through a link called name, as a web server would."""
    link = tmp_path / name
    if not link.exists():
        os.symlink(NPH_WEBJOB, str(link))
    env = {'GATEWAY_INTERFACE': 'CGI/1.1', 'SCRIPT_FILENAME': str(link),
           'SERVER_SOFTWARE': 'TestServer/1.0', 'REMOTE_ADDR': '192.0.2.9',
           'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
           'CONTENT_LENGTH': str(len(body))}
    env.update(environ)
    prefix = ['sh', '-c', 'umask %03o; exec "$0" "$@"' % umask] \
        if umask else []
    return subprocess.run(prefix + [python or sys.executable, str(link)] +
                          list(args), input=body, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=30)


def cgi_config(tmp_path, root, **controls):
    text = 'BaseDirectory = %s\n' % root + ''.join(
        '%s = %s\n' % item for item in controls.items())
    return str(write_file(tmp_path / 'nph-webjob.cfg', text.encode()))


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY])
def test_cgi_nph_mode_writes_the_whole_response(tmp_path, server_root, python):
    cfg = cgi_config(tmp_path, server_root)
    result = run_cgi(tmp_path, 'nph-webjob.cgi', {
        'REQUEST_METHOD': 'GET', 'QUERY_STRING': query(),
        'REMOTE_USER': 'client_1', 'WEBJOB_PROPERTIES_FILE': cfg},
        python=python)
    assert result.stderr == b''
    head, _, body = result.stdout.partition(b'\r\n\r\n')
    lines = head.split(b'\r\n')
    assert lines[:5] == [b'HTTP/1.1 200 OK', b'Server: TestServer/1.0',
                         b'Connection: close',
                         b'Content-Type: application/octet-stream',
                         b'Content-Length: 40']
    assert re.match(br'Job-Id: server_1_\d{10}_\d{5}\Z', lines[5])
    assert len(lines) == 6
    assert body == b'#!/bin/sh\necho "hello from client_1 $*"\n'
    assert last_log(server_root).group('user') == 'client_1'


def test_cgi_job_id_number_is_the_pid(tmp_path, server_root):
    cfg = cgi_config(tmp_path, server_root)
    os.symlink(NPH_WEBJOB, str(tmp_path / 'nph-webjob.cgi'))
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / 'nph-webjob.cgi')],
        env={'GATEWAY_INTERFACE': 'CGI/1.1', 'REQUEST_METHOD': 'GET',
             'QUERY_STRING': query(), 'REMOTE_USER': 'client_1',
             'WEBJOB_PROPERTIES_FILE': cfg}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE)
    job_id = parse_raw(proc.communicate(timeout=30)[0]).field('Job-Id')
    assert job_id.endswith('_%05d' % (proc.pid % 100000))
    assert last_log(server_root).group('job_id') == job_id


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY])
def test_cgi_parsed_header_mode_writes_a_status_field(tmp_path, server_root,
                                                      python):
    cfg = cgi_config(tmp_path, server_root)
    result = run_cgi(tmp_path, 'webjob.cgi', {
        'REQUEST_METHOD': 'GET', 'QUERY_STRING': query(filename='none.sh'),
        'REMOTE_USER': 'client_1', 'WEBJOB_PROPERTIES_FILE': cfg},
        python=python)
    assert result.stdout == (b'Status: 404 Not Found\r\n'
                             b'Content-Type: application/octet-stream\r\n'
                             b'Content-Length: 0\r\n\r\n')


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY])
def test_cgi_put_stores_files_readable_by_all(tmp_path, server_root, python):
    cfg = cgi_config(tmp_path, server_root)
    body = b'out\n' + b'err\n' + ENV_RECORD
    result = run_cgi(tmp_path, 'nph-webjob.cgi', {
        'REQUEST_METHOD': 'PUT', 'REMOTE_USER': 'client_1',
        'QUERY_STRING': put_query(b'out\n', b'err\n', ENV_RECORD),
        'HTTP_JOB_ID': 'server_1_1700000000_00001',
        'WEBJOB_PROPERTIES_FILE': cfg}, body, python=python, umask=0o077)
    assert result.stdout.startswith(b'HTTP/1.1 200 OK\r\n'), result.stderr
    names = incoming(server_root)
    assert len(names) == 4
    for name in names:
        mode = os.stat(str(server_root / 'incoming' / name)).st_mode & 0o777
        assert mode == 0o644, (name, oct(mode))
    assert (server_root / 'incoming' / names[3]).read_bytes() == \
        b'Jid=server_1_1700000000_00001\n'


def test_cgi_ignores_command_line_arguments(tmp_path, server_root):
    cfg = cgi_config(tmp_path, server_root)
    result = run_cgi(tmp_path, 'nph-webjob.cgi', {
        'REQUEST_METHOD': 'GET', 'QUERY_STRING': 'serve',
        'WEBJOB_PROPERTIES_FILE': cfg}, args=['serve'])
    assert result.stdout.startswith(b'HTTP/1.1 450 Invalid Query\r\n')


def test_cgi_bad_config_answers_550_and_logs_to_stderr(tmp_path, server_root):
    cfg = write_file(tmp_path / 'bad.cfg', b'RequireUser = perhaps\n')
    result = run_cgi(tmp_path, 'nph-webjob.cgi', {
        'REQUEST_METHOD': 'GET', 'QUERY_STRING': query(),
        'WEBJOB_PROPERTIES_FILE': str(cfg)})
    assert result.stdout.startswith(
        b'HTTP/1.1 550 Internal Server Initialization Error\r\n')
    assert b'RequireUser' in result.stderr
    assert b'Traceback' not in result.stderr


def test_cgi_path_imports_no_heavy_modules(tmp_path, server_root):
    """Nor trigger, hook or hashing code when those are off."""
    cfg = cgi_config(tmp_path, server_root, RequireUser='N')
    code = ('import io, sys; sys.path.insert(0, %r); import nph_webjob; '
            'out = io.BytesIO(); nph_webjob.run_cgi({"REQUEST_METHOD": "GET", '
            '"QUERY_STRING": %r, "WEBJOB_PROPERTIES_FILE": %r, '
            '"SCRIPT_FILENAME": "/cgi/nph-webjob.cgi"}, io.BytesIO(), '
            'out); assert out.getvalue().startswith(b"HTTP/1.1 200"); '
            'heavy = {"argparse", "http.server", "http.client", "socket", '
            '"ssl", "re", "subprocess", "urllib.parse", "typing", '
            '"hashlib", "threading", "queue", "signal", "tempfile"}; '
            'print(sorted(heavy & set(sys.modules)))'
            % (os.path.dirname(NPH_WEBJOB), query(), cfg))
    result = subprocess.run([NEWEST_PY, '-I', '-c', code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert result.stdout == b'[]\n', result.stderr


# Standalone front end ########################################################

@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY])
def test_standalone_get_then_put_over_raw_sockets(standalone_server, python):
    server = standalone_server(python)
    reply = send(server.port, client_request('GET', server.port, query()))
    assert reply.status_line == 'HTTP/1.1 200 OK'
    assert reply.body == b'#!/bin/sh\necho "hello from client_1 $*"\n'
    job_id = reply.field('Job-Id')
    assert JOB_ID.match(job_id)
    out, err = b'client_1\n', b''
    body = out + err + ENV_RECORD
    reply = send(server.port, client_request(
        'PUT', server.port, put_query(out, err, ENV_RECORD), body, job_id))
    assert (reply.status_line, reply.body) == ('HTTP/1.1 200 OK', b'')
    names = server.incoming()
    assert len(names) == 4 and all(GROUP.match(n) for n in names), names
    group = os.path.join(server.root, 'incoming', names[0][:-4])
    assert [open(group + ext, 'rb').read() for ext in
            ('.out', '.err', '.env', '.rdy')] == [
        out, err, ENV_RECORD, ('Jid=%s\n' % job_id).encode()]
    entries = [LOG_LINE.match(line) for line in server.log_lines(2)]
    assert [(e.group('job_id'), e.group('method'), e.group('status'))
            for e in entries] == [(job_id, 'GET', '200'),
                                  (job_id, 'PUT', '200')]
    assert entries[1].group('length') == str(len(body))


def test_standalone_two_puts_in_one_second_make_two_groups(standalone_server):
    server = standalone_server()
    out = b'same\n'
    request = client_request('PUT', server.port, put_query(out, b'', b''), out)
    for attempt in range(5):         # again if a second boundary fell between
        before = set(server.incoming())
        assert send(server.port, request).status == 200
        assert send(server.port, request).status == 200
        ready = sorted(n for n in set(server.incoming()) - before
                       if n.endswith('.rdy'))
        if len(set(name.split('_')[2] for name in ready)) == 1:
            break
    assert len(ready) == 2 and ready[0].split('_')[2] == ready[1].split('_')[2]
    for name in ready:
        group = os.path.join(server.root, 'incoming', name[:-4])
        assert open(group + '.out', 'rb').read() == out
        assert all(os.path.exists(group + ext) for ext in ('.err', '.env'))


def test_standalone_short_body_is_456_and_leaves_nothing(standalone_server):
    server = standalone_server()
    request = client_request('PUT', server.port, query(lengths=(100, 0, 0)),
                             b'x' * 100)[:-60]
    with socket.create_connection((LOOPBACK, server.port), timeout=15) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reply = read_reply(sock.makefile('rb'))
    assert reply.status_line == 'HTTP/1.1 456 Content-Length Mismatch'
    assert server.incoming() == []
    assert '456 -- Stream length (100)' in server.log_lines(1)[-1]


def send_twice(port, request):
    """The same request twice on one keep-alive connection: two Replies."""
    with socket.create_connection((LOOPBACK, port), timeout=15) as sock:
        reader = sock.makefile('rb')
        sock.sendall(request)
        first = read_reply(reader)
        sock.sendall(request)
        return first, read_reply(reader)


def test_standalone_keeps_the_connection_alive(standalone_server):
    server = standalone_server()
    request = client_request('GET', server.port, query(), close=False)
    first, second = send_twice(server.port, request)
    assert first.status == second.status == 200
    assert first.field('Connection') is None
    assert first.body == second.body and first.body.startswith(b'#!/bin/sh')
    assert first.field('Job-Id') != second.field('Job-Id')


def test_standalone_answers_http_1_0_keep_alive_in_kind(standalone_server):
    server = standalone_server()
    request = ('GET %s?%s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n'
               % (CGI_PATH, query())).encode()
    first, second = send_twice(server.port, request)
    assert first.field('Connection') == 'keep-alive'
    assert first.status == second.status == 200


def test_standalone_reads_a_refused_body_and_keeps_the_connection(
        standalone_server):
    """The refused body is drained (up to DRAIN_LIMIT), so the next request
    on the connection is read from where the body ended."""
    server = standalone_server()
    request = client_request('PUT', server.port, query(lengths=(1, 0, 0)),
                             b'four', close=False)
    with socket.create_connection((LOOPBACK, server.port), timeout=15) as sock:
        sock.sendall(request + client_request('GET', server.port, query()))
        reader = sock.makefile('rb')
        reply = read_reply(reader)
        assert reply.status == 456 and reply.field('Connection') is None
        assert read_reply(reader).status == 200


def test_standalone_streams_large_bodies_intact(standalone_server):
    server = standalone_server()
    big = os.urandom(3 * 1024 * 1024 + 17)
    write_file(os.path.join(server.root, 'profiles/common/commands/big.bin'),
               big)
    reply = send(server.port, client_request('GET', server.port,
                                             query(filename='big.bin')))
    assert reply.body == big
    out, err = big, os.urandom(2 * 1024 * 1024 + 3)
    reply = send(server.port, client_request(
        'PUT', server.port, put_query(out, err, ENV_RECORD),
        out + err + ENV_RECORD))
    assert reply.status == 200
    names = server.incoming()
    with open(os.path.join(server.root, 'incoming', names[1]), 'rb') as handle:
        assert handle.read() == err                   # the .err file


def test_standalone_other_methods_are_405(standalone_server):
    server = standalone_server()
    reply = send(server.port, client_request('DELETE', server.port, query()))
    assert reply.status_line == 'HTTP/1.1 405 Method Not Allowed'


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_standalone_stops_cleanly_on_a_signal(standalone_server, signum):
    server = standalone_server()
    assert server.stop(signum) == 0
    assert 'Traceback' not in server.stderr()


@pytest.mark.parametrize('bind', ['0.0.0.0', '::', '192.0.2.1'])
def test_serve_refuses_to_bind_a_non_loopback_address(tmp_path, bind):
    result = subprocess.run([sys.executable, NPH_WEBJOB, 'serve', '--root',
                             str(tmp_path / 'root'), '--bind', bind],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=30)
    err = result.stderr.decode()
    assert result.returncode != 0
    assert err.count('\n') == 1 and 'refusing to listen' in err, err
    assert not (tmp_path / 'root').exists()


def test_serve_creates_the_default_tree(standalone_server, tmp_path):
    server = standalone_server(root='webjob-server', cwd=str(tmp_path))
    root = tmp_path / 'webjob-server'
    assert sorted(os.listdir(str(root))) == ['incoming', 'logfiles',
                                             'profiles']
    sample = root / 'profiles/client_1/commands/hostname.sh'
    assert sample.read_bytes() == b'#!/bin/sh\nhostname\ndate\n'
    assert os.stat(str(sample)).st_mode & 0o777 == 0o755
    assert 'http://127.0.0.1:%d/' % server.port in server.stderr()
    assert str(root) in server.stderr()
    reply = send(server.port, client_request('GET', server.port, query()))
    assert reply.body == b'#!/bin/sh\nhostname\ndate\n'


def test_serve_without_root_uses_webjob_server_in_the_cwd(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, NPH_WEBJOB, 'serve', '--port',
                             str(port)], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(LOOPBACK, port, proc=proc)
        assert (tmp_path / 'webjob-server/profiles/client_1/commands/'
                'hostname.sh').is_file()
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_serve_leaves_an_existing_tree_alone(standalone_server, server_root):
    mine = server_root / 'profiles/client_1/commands/hostname.sh'
    write_file(mine, b'mine')
    before = tree(server_root)
    standalone_server(root=server_root)
    assert mine.read_bytes() == b'mine' and tree(server_root) == before


def test_serve_reads_a_config_file(standalone_server, server_root, tmp_path):
    cfg = write_file(tmp_path / 'serve.cfg', b'ServerId = lab_7\n')
    server = standalone_server(root=server_root, args=['--config', str(cfg)])
    reply = send(server.port, client_request('GET', server.port, query()))
    assert reply.field('Job-Id').startswith('lab_7_')


def test_serve_with_a_bad_config_exits_with_one_line(tmp_path):
    cfg = write_file(tmp_path / 'serve.cfg', b'UseGMT = often\n')
    result = subprocess.run([sys.executable, NPH_WEBJOB, 'serve', '--config',
                             str(cfg), '--root', str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=30)
    assert result.returncode == 1
    assert result.stderr.count(b'\n') == 1 and b'UseGMT' in result.stderr


def test_real_client_job_against_the_standalone_server(standalone_server,
                                                       tmp_path):
    server = standalone_server()
    job_dir = tmp_path / 'job'
    job_dir.mkdir()
    cfg = write_file(tmp_path / 'webjob.cfg', (
        'ClientId=client_1\nURLGetURL=%s\nURLPutURL=%s\nTempDirectory=%s\n'
        % (server.cgi_url, server.cgi_url, job_dir)).encode())
    result = subprocess.run([sys.executable, WEBJOB, '-e', '-f', str(cfg),
                             'hostname.sh', 'arg'], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr
    names = server.incoming()
    group = os.path.join(server.root, 'incoming', names[0][:-4])
    job_id = LOG_LINE.match(server.log_lines(1)[0]).group('job_id')
    assert open(group + '.out', 'rb').read() == b'hello from client_1 arg\n'
    assert open(group + '.rdy').read() == 'Jid=%s\n' % job_id
    assert ('Jid=%s\n' % job_id) in open(group + '.env').read()


# Command line ################################################################

def test_help_prints_usage(capsys):
    assert nph_webjob.main(['--help']) == 0
    assert 'serve [--root DIR]' in capsys.readouterr().out


@pytest.mark.parametrize('argv', [[], ['bogus'], ['serve', '--port', 'x'],
                                  ['serve', '--port', '70000'],
                                  ['serve', '--nope']])
def test_bad_command_line_is_a_usage_error(capsys, argv):
    assert nph_webjob.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('nph_webjob: ') and 'Usage:' in err


# install-cgi ##################################################################

def copy_server(tmp_path):
    """webjob.py and nph_webjob.py side by side in a folder of their own."""
    lib = tmp_path / 'lib'
    lib.mkdir()
    for source in (NPH_WEBJOB, WEBJOB):
        write_file(lib / os.path.basename(source), open(source, 'rb').read())
    return lib


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY])
def test_install_cgi_writes_a_stub_over_compiled_modules(tmp_path, server_root,
                                                         python):
    lib = copy_server(tmp_path)
    stub = tmp_path / 'nph-webjob.cgi'
    cfg = cgi_config(tmp_path, server_root, RequireUser='N')
    subprocess.run([python, str(lib / 'nph_webjob.py'), 'install-cgi',
                    str(stub), '--config', cfg, '--force'], check=True)
    tag = subprocess.run([python, '-c', 'import sys; print(sys.implementation'
                          '.cache_tag)'], stdout=subprocess.PIPE,
                         check=True).stdout.decode().strip()
    assert sorted(os.listdir(str(lib / '__pycache__'))) == [
        'nph_webjob.%s.pyc' % tag, 'webjob.%s.pyc' % tag]
    assert stub.read_text().startswith('#!%s -IS\n' % python)
    assert os.stat(str(stub)).st_mode & 0o777 == 0o755
    env = {'GATEWAY_INTERFACE': 'CGI/1.1', 'REQUEST_METHOD': 'GET',
           'QUERY_STRING': query(), 'PATH': os.environ['PATH'],
           'SCRIPT_FILENAME': str(stub)}
    result = subprocess.run([str(stub)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert result.stdout.startswith(b'HTTP/1.1 200 OK\r\n'), result.stderr
    assert result.stdout.endswith(b'echo "hello from client_1 $*"\n')


@pytest.mark.parametrize('argv', [['install-cgi'],
                                  ['install-cgi', 'a', 'b'],
                                  ['install-cgi', 'a', '--conf', 'c']])
def test_install_cgi_needs_a_path(capsys, argv):
    assert nph_webjob.main(argv) == 2
    assert 'install-cgi PATH' in capsys.readouterr().err


def test_install_cgi_into_a_missing_folder_is_one_line(tmp_path):
    lib = copy_server(tmp_path)
    result = subprocess.run([sys.executable, str(lib / 'nph_webjob.py'),
                             'install-cgi', str(tmp_path / 'no' / 'x.cgi'),
                             '--force'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        'nph_webjob: %s: No such file or directory'
        % (tmp_path / 'no' / 'x.cgi')]
    assert not (tmp_path / 'no').exists()


# Real Apache #################################################################

CLIENT_1 = ('client_1', 'secret-1')


def test_apache_serves_a_get_with_basic_auth(apache_server):
    apache = apache_server()
    apache.clean()
    reply = send(apache.port, client_request('GET', apache.port, query(),
                                             auth=CLIENT_1))
    assert reply.fields[:3] == [('Server', reply.field('Server')),
                                ('Connection', 'close'),
                                ('Content-Type', 'application/octet-stream')]
    assert reply.status_line == 'HTTP/1.1 200 OK'
    assert reply.body == b'#!/bin/sh\necho "hello from client_1 $*"\n'
    assert JOB_ID.match(reply.field('Job-Id'))
    entry = LOG_LINE.match(apache.log_lines(1)[-1])
    assert entry.group('user', 'addr', 'method', 'status') == (
        'client_1', '127.0.0.1', 'GET', '200')


def test_apache_put_stores_the_group_as_the_web_server_user(apache_server):
    apache = apache_server()
    apache.clean()
    out = b'uploaded\n'
    reply = send(apache.port, client_request(
        'PUT', apache.port, put_query(out, b'', ENV_RECORD), out + ENV_RECORD,
        'server_1_1700000000_00009', CLIENT_1))
    assert reply.status_line == 'HTTP/1.1 200 OK'
    names = apache.incoming()
    assert len(names) == 4 and all(GROUP.match(n) for n in names), names
    for name in names:
        info = os.stat(os.path.join(apache.root, 'incoming', name))
        assert info.st_uid != 0 and info.st_mode & 0o777 == 0o644
    with open(os.path.join(apache.root, 'incoming', names[3])) as rdy:
        assert rdy.read() == 'Jid=server_1_1700000000_00009\n'


def test_apache_refuses_a_request_without_credentials(apache_server):
    apache = apache_server()
    reply = send(apache.port, client_request('GET', apache.port, query()))
    assert reply.status == 401 and reply.field('WWW-Authenticate')


def test_apache_user_other_than_the_client_id_is_453(apache_server):
    apache = apache_server()
    apache.clean()
    reply = send(apache.port, client_request('GET', apache.port, query(),
                                             auth=('client_2', 'secret-2')))
    assert reply.status_line == 'HTTP/1.1 453 Username-ClientId Mismatch'
    assert LOG_LINE.match(apache.log_lines(1)[-1]).group('user') == 'client_2'


def test_apache_passes_450_and_its_reason_through_nph(apache_server):
    apache = apache_server()
    reply = send(apache.port, client_request(
        'GET', apache.port, query(filename='..%2fhostname.sh'), auth=CLIENT_1))
    assert reply.status_line == 'HTTP/1.1 450 Invalid Query'
    assert reply.field('Content-Length') == '0'


def test_apache_parsed_header_cgi_keeps_status_and_job_id(apache_server):
    apache = apache_server()
    reply = send(apache.port, client_request('GET', apache.port, query(),
                                             auth=CLIENT_1,
                                             path=PARSED_CGI_PATH))
    assert reply.status_line == 'HTTP/1.1 200 OK'
    assert JOB_ID.match(reply.field('Job-Id')) and reply.field('Date')
    reply = send(apache.port, client_request(
        'GET', apache.port, query(filename='none.sh'), auth=CLIENT_1,
        path=PARSED_CGI_PATH))
    assert reply.status_line == 'HTTP/1.1 404 Not Found'


def test_apache_cgi_runs_on_the_oldest_python(apache_server):
    apache = apache_server(OLDEST_PY)
    apache.clean()
    reply = send(apache.port, client_request('GET', apache.port, query(),
                                             auth=CLIENT_1))
    assert reply.status == 200
    out = b'old python\n'
    reply = send(apache.port, client_request(
        'PUT', apache.port, put_query(out, b'', b''), out,
        reply.field('Job-Id'), CLIENT_1))
    assert reply.status == 200 and len(apache.incoming()) == 4


def test_real_client_job_through_apache(apache_server, tmp_path):
    apache = apache_server()
    apache.clean()
    job_dir = tmp_path / 'job'
    job_dir.mkdir()
    cfg = write_file(tmp_path / 'webjob.cfg', (
        'ClientId=client_1\nURLGetURL=%s\nURLPutURL=%s\nTempDirectory=%s\n'
        'URLAuthType=basic\nURLUsername=client_1\nURLPassword=secret-1\n'
        % (apache.cgi_url, apache.cgi_url, job_dir)).encode())
    result = subprocess.run([sys.executable, WEBJOB, '-e', '-f', str(cfg),
                             'hostname.sh', 'via', 'apache'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    names = apache.incoming()
    with open(os.path.join(apache.root, 'incoming', names[2]), 'rb') as out:
        assert out.read() == b'hello from client_1 via apache\n'
    job_ids = set(LOG_LINE.match(line).group('job_id')
                  for line in apache.log_lines(2))
    assert len(job_ids) == 1


# Fixtures used above #########################################################

@pytest.fixture
def local_tz(monkeypatch):
    """Switch the process's local time zone for one test."""
    def switch(zone):
        monkeypatch.setenv('TZ', zone)
        time.tzset()
    yield switch
    monkeypatch.undo()
    time.tzset()


# htpasswd (the standalone server's Basic authentication) #####################

HTPASSWD_PASSWORD = 'pa:ss w\xf6rd'


def htpasswd_usage():
    """Return htpasswd's usage text (it prints it for an unknown option)."""
    result = subprocess.run(['htpasswd', '-h'], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    return result.stdout.decode('ascii', 'replace')


FORMATS = [['-m'], ['-s']]
if ' -2 ' in htpasswd_usage():
    FORMATS += [['-2'], ['-5'], ['-5', '-r', '1000']]


def make_hash(flags, password=HTPASSWD_PASSWORD, user='user'):
    """Return the hash htpasswd -nb writes for password."""
    out = subprocess.check_output(['htpasswd', '-nb'] + flags
                                  + [user, password],
                                  stderr=subprocess.DEVNULL)
    return out.decode('utf-8').strip().split(':', 1)[1]


@pytest.mark.parametrize('flags', FORMATS, ids=' '.join)
def test_right_password_accepted(flags):
    assert nph_webjob.check_htpasswd_password(make_hash(flags), HTPASSWD_PASSWORD) is True


@pytest.mark.parametrize('flags', FORMATS, ids=' '.join)
def test_wrong_password_refused(flags):
    assert nph_webjob.check_htpasswd_password(make_hash(flags), HTPASSWD_PASSWORD + 'x') is False


@pytest.mark.parametrize('flags', FORMATS, ids=' '.join)
def test_empty_password_round_trips(flags):
    stored = make_hash(flags, password='')
    assert nph_webjob.check_htpasswd_password(stored, '') is True
    assert nph_webjob.check_htpasswd_password(stored, ' ') is False


def test_bytes_password_accepted():
    stored = make_hash(['-m'])
    assert nph_webjob.check_htpasswd_password(stored, HTPASSWD_PASSWORD.encode('utf-8')) is True


@pytest.mark.parametrize('flags,name', [(['-B'], 'bcrypt'),
                                        (['-d'], 'des-crypt'),
                                        (['-p'], 'plaintext or unknown')])
def test_uncheckable_format_raises(flags, name):
    stored = make_hash(flags, password='secret')
    with pytest.raises(nph_webjob.UnsupportedHashError) as info:
        nph_webjob.check_htpasswd_password(stored, 'secret')
    assert str(info.value) == name


@pytest.mark.parametrize('stored', ['$5$rounds=1x$salt$abc',
                                    '$6$rounds=2000000$salt$abc',
                                    '$apr1$saltonly', '$6$a$b$c$d'])
def test_malformed_or_costly_hash_raises(stored):
    with pytest.raises(nph_webjob.UnsupportedHashError):
        nph_webjob.check_htpasswd_password(stored, 'x')


def test_overlong_password_refused_without_hashing():
    stored = make_hash(['-5'])
    assert nph_webjob.check_htpasswd_password(stored, 'x' * 100000) is False


def test_thousand_user_file_parses(tmp_path):
    stored = make_hash(['-m'])
    lines = ['# made by test', '', 'no colon here']
    lines += ['user%04d:%s' % (i, stored) for i in range(1000)]
    path = tmp_path / 'htpasswd'
    path.write_bytes('\r\n'.join(lines + ['']).encode('utf-8'))
    users = nph_webjob.read_htpasswd(str(path))
    assert len(users) == 1000
    assert nph_webjob.check_htpasswd_password(users['user0999'], HTPASSWD_PASSWORD) is True


def test_first_entry_wins_and_hash_ends_at_colon(tmp_path):
    path = tmp_path / 'htpasswd'
    path.write_bytes(b'u:{SHA}first:comment\nu:{SHA}second\n')
    assert nph_webjob.read_htpasswd(str(path)) == {'u': '{SHA}first'}


def test_unreadable_file_raises_webjob_error(tmp_path):
    with pytest.raises(nph_webjob.webjob.WebJobError):
        nph_webjob.read_htpasswd(str(tmp_path / 'missing'))


# Server features: fronts (standalone and Apache) #############################

TRIGGER_LINE = re.compile(
    r'(?P<date>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?P<job_id>\S+) '
    r'(?P<method>\S+) (?P<client_id>\S+) (?P<filename>\S+) (?P<label>\S+) '
    r'(?P<pid>\S+) (?P<state>\S+) --(?: (?P<message>[ -~]*))?\Z')
CLIENT_2 = ('client_2', 'secret-2')
PUT_JOB_ID = 'server_1_1700000000_00042'


def env_record(out=b'', err=b'', hash_type='MD5', out_hash=None,
               err_hash=None):
    """An .env as webjob.py writes it (the keys the server reads)."""
    import hashlib
    digest = lambda data: hashlib.new(hash_type.lower(), data).hexdigest()
    return ('Version=webjob 1.0.0 ssl dsv 64 bit\nClientId=client_1\n'
            'Jid=%s\nKidStatus=0\nHashType=%s\nStdOutHash=%s\n'
            'StdErrHash=%s\n' % (PUT_JOB_ID, hash_type,
                                 out_hash or digest(out),
                                 err_hash or digest(err))).encode()


def live_group_members(pgid):
    """Pids of processes in a process group that are not zombies."""
    found = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as handle:
                fields = handle.read().rpartition(')')[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != 'Z':
            found.append(int(name))
    return found


class Front(object):
    """One server under test: its tree, config folder and requests."""

    def __init__(self, kind, port, root, config_dir, scratch):
        self.kind = kind
        self.port = port
        self.root = str(root)
        self.config_dir = config_dir
        self.scratch = scratch

    def request(self, method, query_string, body=b'', job_id=None,
                user=CLIENT_1):
        auth = user if self.kind == 'apache' else None
        return send(self.port, client_request(method, self.port, query_string,
                                              body, job_id, auth))

    def put(self, out=b'hello\n', err=b'', env=ENV_RECORD, user=CLIENT_1,
            **kwargs):
        return self.request('PUT', put_query(out, err, env, **kwargs),
                            out + err + env, PUT_JOB_ID, user)

    def override(self, text, client='client_1', command=None):
        folder = os.path.join(self.config_dir, 'clients', client)
        if command:
            folder = os.path.join(folder, 'commands')
        os.makedirs(folder, exist_ok=True)
        os.chmod(os.path.join(self.config_dir, 'clients'), 0o755)
        name = command + '.cfg' if command else 'nph-webjob.cfg'
        write_file(os.path.join(folder, name), text.encode())

    def log_lines(self, count=0):
        return read_log_lines(self.root, count)

    def trigger_lines(self, count):
        return wait_for_lines(os.path.join(
            self.root, 'logfiles', 'nph-webjob-trigger.log'), count)

    def incoming(self):
        return incoming(self.root)

    def verify(self):
        return subprocess.run([sys.executable, NPH_WEBJOB, 'verify', '--root',
                               self.root], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)


@pytest.fixture(params=['standalone', 'apache'])
def front(request, tmp_path, standalone_server):
    """Factory: start(**controls) gives a Front whose nph-webjob.cfg holds
    those controls: a standalone server with --config, or the session's
    Apache (its config restored and its extra files removed afterwards)."""
    import shutil
    import tempfile
    if request.param == 'standalone':
        config_dir = tmp_path / 'config'
        config_dir.mkdir()
        scratch = str(tmp_path / 'scratch')
        os.mkdir(scratch)

        def start(**controls):
            cfg = write_file(config_dir / 'nph-webjob.cfg', ''.join(
                '%s = %s\n' % (name, value.replace('{scratch}', scratch))
                for name, value in controls.items()).encode())
            server = standalone_server(args=['--config', str(cfg)])
            return Front('standalone', server.port, server.root,
                         str(config_dir), scratch)
        yield start
        return
    apache = request.getfixturevalue('apache_server')()
    apache.clean()
    cfg = os.path.join(apache.top, 'nph-webjob.cfg')
    with open(cfg, 'rb') as handle:
        original = handle.read()
    scratch = tempfile.mkdtemp(dir=apache.top)
    os.chmod(scratch, 0o777)
    extras = [os.path.join(apache.root, 'logfiles', name) for name in (
        'nph-webjob-trigger.log', 'nph-webjob-manifest.sha256')]
    for path in extras:
        if os.path.exists(path):
            os.unlink(path)

    def start(**controls):
        write_file(cfg, original + ''.join(
            '%s = %s\n' % (name, value.replace('{scratch}', scratch))
            for name, value in controls.items()).encode())
        return Front('apache', apache.port, apache.root, apache.top, scratch)
    try:
        yield start
    finally:
        write_file(cfg, original)
        shutil.rmtree(os.path.join(apache.top, 'clients'), ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        for path in extras:
            if os.path.exists(path):
                os.unlink(path)
        apache.clean()


# Triggers ####################################################################

def test_put_trigger_expands_every_token(front):
    server = front(PutTriggerEnable='Y', PutTriggerCommandLine=(
        "printf '%%s|' %rdy %jid %cid %cmd %out %err %env %ip 100%% > "
        "{scratch}/tokens"))
    assert server.put().status == 200
    lines = server.trigger_lines(2)
    assert TRIGGER_LINE.match(lines[1]).group('state') == 'finished', lines
    group = [n for n in server.incoming() if n.endswith('.rdy')][0][:-4]
    stem = os.path.join(server.root, 'incoming', group)
    with open(os.path.join(server.scratch, 'tokens')) as handle:
        assert handle.read().split('|') == [
            stem + '.rdy', PUT_JOB_ID, 'client_1', 'hostname.sh',
            stem + '.out', stem + '.err', stem + '.env', '127.0.0.1', '100%',
            '']


def test_trigger_log_has_the_ten_fields_for_start_and_end(front):
    server = front(PutTriggerEnable='Y', PutTriggerCommandLine='exit 3')
    assert server.put().status == 200
    start, end = [TRIGGER_LINE.match(line) for line in
                  server.trigger_lines(2)]
    assert start.group('job_id', 'method', 'client_id', 'filename', 'label',
                       'state') == (PUT_JOB_ID, 'PUT', 'client_1',
                                    'hostname.sh', 'KidPid', 'started')
    assert start.group('message') == "Command (exit 3)"
    assert end.group('pid') == start.group('pid') and int(end.group('pid'))
    assert end.group('state', 'message') == ('finished', 'Exit status (3)')


def test_get_trigger_runs_after_a_get(front):
    server = front(GetTriggerEnable='Y',
                   GetTriggerCommandLine='test -z %rdy && exit 7')
    reply = server.request('GET', query())
    assert reply.status == 200
    start, end = [TRIGGER_LINE.match(line) for line in
                  server.trigger_lines(2)]
    assert start.group('method', 'job_id') == ('GET', reply.field('Job-Id'))
    assert end.group('message') == 'Exit status (7)'


def test_hanging_trigger_is_killed_at_the_limit(front):
    server = front(PutTriggerEnable='Y', TriggerTimeLimit='1',
                   PutTriggerCommandLine='sleep 60; sleep 60')
    assert server.put().status == 200
    start, end = [TRIGGER_LINE.match(line) for line in
                  server.trigger_lines(2)]
    assert end.group('state') == 'timeout'
    assert end.group('message') == ('Signal (9) to the process group when '
                                    'TriggerTimeLimit (1 s) expired')
    assert live_group_members(int(start.group('pid'))) == []


def test_answer_does_not_wait_for_the_trigger(front):
    """The trigger runs for 600 s: an answer that waited for it would time
    out; the answer comes while the trigger is still running."""
    server = front(PutTriggerEnable='Y', TriggerTimeLimit='0',
                   PutTriggerCommandLine='sleep 600')
    reply = server.put()
    assert reply.status == 200
    pid = int(TRIGGER_LINE.match(server.trigger_lines(1)[0]).group('pid'))
    assert live_group_members(pid) != []
    os.killpg(pid, signal.SIGKILL)
    assert TRIGGER_LINE.match(server.trigger_lines(2)[1]).group(
        'state') == 'killed'


def test_trigger_is_started_without_forking_the_threaded_server(
        tmp_path, standalone_server):
    """Python 3.12+ warns when a threaded process forks (the child may
    deadlock); the supervisor is a fresh interpreter instead."""
    cfg = write_file(tmp_path / 'nph-webjob.cfg', b'PutTriggerEnable = Y\n'
                     b'PutTriggerCommandLine = true\n')
    server = standalone_server(python=NEWEST_PY, args=['--config', str(cfg)])
    front = Front('standalone', server.port, server.root, str(tmp_path),
                  str(tmp_path))
    assert front.put().status == 200
    lines = front.trigger_lines(2)
    assert TRIGGER_LINE.match(lines[1]).group('state') == 'finished', lines
    assert 'Warning' not in server.stderr()


def test_failed_put_runs_no_trigger(server_root):
    site = make_site(server_root, PutTriggerEnable=True,
                     PutTriggerCommandLine='true')
    assert put(site, CONTENT_LENGTH='1')[0] == 456
    assert not (server_root / 'logfiles' / 'nph-webjob-trigger.log').exists()


def test_trigger_environment_holds_no_request_headers(tmp_path, server_root):
    cfg = cgi_config(tmp_path, server_root, RequireUser='N',
                     PutTriggerEnable='Y', PutTriggerCommandLine=(
                         'env > %s' % (tmp_path / 'env')))
    body = b'out\n' + ENV_RECORD
    result = run_cgi(tmp_path, 'nph-webjob.cgi', {
        'REQUEST_METHOD': 'PUT', 'HTTP_X_EVIL': '() { :; }; touch /tmp/x',
        'QUERY_STRING': put_query(b'out\n', b'', ENV_RECORD),
        'WEBJOB_PROPERTIES_FILE': cfg}, body)
    assert result.stdout.startswith(b'HTTP/1.1 200 OK'), result.stderr
    wait_for_lines(server_root / 'logfiles' / 'nph-webjob-trigger.log', 2)
    names = set(line.partition('=')[0] for line in
                (tmp_path / 'env').read_text().splitlines())
    assert 'HTTP_X_EVIL' not in names and 'QUERY_STRING' not in names


@pytest.mark.parametrize('controls, words', [
    ({'PutTriggerEnable': 'Y'}, ['PutTriggerEnable', 'required']),
    ({'GetTriggerCommandLine': 'run %bogus'}, ['GetTriggerCommandLine',
                                               'unknown token']),
    ({'GetHookCommandLine': 'gzip %rdy'}, ['GetHookCommandLine',
                                           'unknown token']),
    ({'GetHookSuffix': 'gz;rm'}, ['GetHookSuffix']),
])
def test_bad_trigger_or_hook_config_is_550_naming_the_control(
        tmp_path, server_root, controls, words):
    cfg = cgi_config(tmp_path, server_root, **controls)
    with pytest.raises(nph_webjob.HTTPStatusError) as info:
        nph_webjob.load_site(cfg)
    assert info.value.status == 550
    assert all(word in info.value.message for word in words + [cfg + ':'])


# Overrides ###################################################################

def test_client_override_applies_to_that_client_only(front):
    server = front(RequireUser='N')
    server.override('CapContentLength = Y\nMaxContentLength = 4\n')
    assert server.put(b'too long\n').status == 455
    assert server.put(b'too long\n', clientid='client_2',
                      user=CLIENT_2).status == 200


def test_command_override_wins_over_the_client_override(front):
    server = front(RequireUser='N')
    server.override('CapContentLength = Y\nMaxContentLength = 1000\n')
    server.override('MaxContentLength = 4\n', command='hostname.sh')
    assert server.put(b'too long\n').status == 455
    assert server.put(b'too long\n', filename='other.sh').status == 200


def test_override_trying_to_loosen_require_user_is_550(front):
    server = front(RequireUser='Y', RequireMatch='Y')
    server.override('RequireUser = N\n')
    reply = server.request('GET', query())
    assert reply.status == 550
    entry = LOG_LINE.match(server.log_lines(1)[-1])
    assert 'RequireUser = [N]: may only tighten' in entry.group('message')
    assert os.path.join('clients', 'client_1', 'nph-webjob.cfg') in \
        entry.group('message')
    other = server.request('GET', query('client_2', 'common.sh'),
                           user=CLIENT_2)
    assert other.status == (200 if server.kind == 'apache' else 452)


def test_override_may_tighten_require_user(server_root):
    site = make_site(server_root)
    os.makedirs(os.path.join(site.override_dir, 'client_1'))
    write_file(os.path.join(site.override_dir, 'client_1', 'nph-webjob.cfg'),
               b'RequireUser = Y\n')
    assert call(site)[0] == 452
    assert call(site, REMOTE_USER='client_1')[0] == 200


@pytest.mark.parametrize('text', [b'BaseDirectory = /tmp\n',
                                  b'ServerId = evil\n', b'RequireUser = maybe\n',
                                  b'PutTriggerCommandLine = x %nope\n'])
def test_bad_override_is_550_for_that_client_only(server_root, text):
    site = make_site(server_root)
    folder = os.path.join(site.override_dir, 'client_1', 'commands')
    os.makedirs(folder)
    write_file(os.path.join(folder, 'hostname.sh.cfg'), text)
    assert call(site)[0] == 550
    assert 'hostname.sh.cfg:1' in last_log(server_root).group('message')
    assert call(site, query_string=query('client_2', 'common.sh'))[0] == 200


def test_override_directory_control_moves_the_tree(server_root, tmp_path):
    site = make_site(server_root, OverrideDirectory=str(tmp_path / 'ovr'))
    os.makedirs(str(tmp_path / 'ovr' / 'client_1'))
    write_file(tmp_path / 'ovr' / 'client_1' / 'nph-webjob.cfg',
               b'RequireUser = Y\n')
    assert call(site)[0] == 452


# GetHook #####################################################################

def test_get_hook_serves_a_variant_made_on_request(front):
    import gzip
    server = front(GetHookEnable='Y', GetHookSuffix='.gz',
                   GetHookCommandLine='gzip -c -n %tp')
    reply = server.request('GET', query(filename='hostname.sh.gz'))
    assert reply.status == 200
    assert gzip.decompress(reply.body) == \
        b'#!/bin/sh\necho "hello from client_1 $*"\n'
    entry = LOG_LINE.match(server.log_lines(1)[-1])
    assert entry.group('message') == ('Success: served GetHook output of '
                                      'profiles/client_1/commands/hostname.sh')
    assert int(entry.group('server_length')) == len(reply.body)


def test_get_hook_leaves_names_without_its_suffix_alone(server_root):
    site = make_site(server_root, GetHookEnable=True, GetHookSuffix='.gz',
                     GetHookCommandLine='exit 1')
    status, reply = call(site)
    assert status == 200 and reply.body.startswith(b'#!/bin/sh')


def test_get_hook_past_its_time_limit_is_457(server_root):
    site = make_site(server_root, GetHookEnable=True, GetHookTimeLimit=1,
                     GetHookCommandLine='sleep 60; cat %tp')
    assert call(site)[0] == 457
    assert 'GetHookTimeLimit (1 s) expired' in last_log(server_root).group(
        'message')


def test_failing_get_hook_is_457_with_its_error(server_root):
    site = make_site(server_root, GetHookEnable=True,
                     GetHookCommandLine='echo no key >&2; exit 2')
    assert call(site)[0] == 457
    assert last_log(server_root).group('message').endswith(
        'failed: exit status (2): no key')


# Integrity ###################################################################

@pytest.mark.parametrize('hash_type', ['MD5', 'SHA1', 'SHA256'])
def test_put_checks_the_declared_hash_type(server_root, hash_type):
    site = make_site(server_root)
    env = env_record(b'hello\n', b'', hash_type)
    assert put(site, env=env)[0] == 200
    assert last_log(server_root).group('message') == \
        'Success; hashes match (%s)' % hash_type
    assert len(incoming(server_root)) == 4


def test_large_put_is_hashed_while_it_is_copied(server_root):
    site = make_site(server_root)
    out = os.urandom(nph_webjob.THREAD_HASH_MIN + 12345)
    assert put(site, out, env=env_record(out))[0] == 200
    assert last_log(server_root).group('message') == \
        'Success; hashes match (MD5)'


def test_put_whose_declared_hash_differs_is_kept_and_flagged(front):
    server = front(RequireUser='N')
    env = env_record(out_hash='0' * 32)
    assert server.put(b'evidence\n', env=env).status == 200
    names = server.incoming()
    assert [n.rpartition('.')[2] for n in names] == [
        'bad', 'env', 'err', 'out', 'rdy']
    with open(os.path.join(server.root, 'incoming', names[3]), 'rb') as out:
        assert out.read() == b'evidence\n'
    assert 'hash mismatch: StdOutHash (MD5)' in LOG_LINE.match(
        server.log_lines(1)[-1]).group('message')
    result = server.verify()
    assert result.returncode == 1
    assert b'.bad: flagged at upload: mismatch: StdOutHash' in result.stdout


def test_tampered_out_after_upload_is_found_by_verify(front):
    server = front(RequireUser='N')
    assert server.put(b'evidence\n', env=env_record(b'evidence\n')).status \
        == 200
    clean = server.verify()
    assert clean.returncode == 0, clean.stdout
    out = [n for n in server.incoming() if n.endswith('.out')][0]
    write_file(os.path.join(server.root, 'incoming', out), b'forged!!\n')
    result = server.verify()
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert '%s: does not match StdOutHash (MD5) in .env' % out in lines
    assert '%s: changed since upload (SHA-256 differs from the manifest)' \
        % out in lines


def test_manifest_is_checked_by_sha256sum(server_root):
    site = make_site(server_root)
    assert put(site, env=env_record(b'hello\n'))[0] == 200
    result = subprocess.run(['sha256sum', '-c', '--strict', os.path.join(
        '..', 'logfiles', 'nph-webjob-manifest.sha256')],
        cwd=str(server_root / 'incoming'), stdout=subprocess.PIPE)
    assert result.returncode == 0 and result.stdout.count(b': OK\n') == 4


def test_verify_reports_an_incomplete_group(server_root):
    site = make_site(server_root)
    assert put(site)[0] == 200
    rdy = [n for n in incoming(server_root) if n.endswith('.rdy')][0]
    os.unlink(str(server_root / 'incoming' / rdy))
    result = subprocess.run([sys.executable, NPH_WEBJOB, 'verify', '--root',
                             str(server_root)], stdout=subprocess.PIPE)
    assert result.returncode == 1
    assert ('%s: incomplete: no .rdy' % rdy[:-4]).encode() in result.stdout


def test_verify_reports_a_group_the_server_never_stored(server_root):
    make_site(server_root)
    for ext in ('out', 'err', 'env', 'rdy'):
        write_file(server_root / 'incoming' / (
            'client_1_20240101000000_00001_x.sh.' + ext), b'planted\n')
    result = subprocess.run([sys.executable, NPH_WEBJOB, 'verify', '--root',
                             str(server_root)], stdout=subprocess.PIPE)
    assert result.returncode == 1
    assert result.stdout.count(b': not in the manifest\n') == 4


def test_integrity_off_writes_no_manifest(server_root):
    site = make_site(server_root, IntegrityEnable=False)
    assert put(site, env=env_record(out_hash='0' * 32))[0] == 200
    assert last_log(server_root).group('message') == 'Success'
    assert not (server_root / 'logfiles' / 'nph-webjob-manifest.sha256'
                ).exists()


def test_list_prints_one_line_per_job(server_root):
    now = [1700000000]
    site = make_site(server_root, clock=lambda: now[0], UseGMT=True)
    assert put(site, b'12345', env=env_record(b'12345'),
               HTTP_JOB_ID=PUT_JOB_ID)[0] == 200
    now[0] = 1800000000
    assert call(site, 'PUT', query('client_2', lengths=(
        1, 0, len(ENV_RECORD))), b'1' + ENV_RECORD)[0] == 200
    run = lambda *args: subprocess.run(
        [sys.executable, NPH_WEBJOB, 'list', '--root', str(server_root)] +
        list(args), stdout=subprocess.PIPE, check=True).stdout.decode()
    lines = run().splitlines()
    assert re.match(r'2023-11-14 22:13:20 client_1 hostname\.sh %s 0 5 0 %d\Z'
                    % (PUT_JOB_ID, len(env_record(b'12345'))), lines[0]), lines
    assert re.match(r'2027-01-15 08:00:00 client_2 hostname\.sh '
                    r'server_1_1800000000_\d{5} - 1 0 %d\Z'
                    % len(ENV_RECORD), lines[1]), lines
    assert run('--client', 'client_2') == lines[1] + '\n'
    assert run('--since', '2025-01-01') == lines[1] + '\n'


@pytest.mark.parametrize('argv', [['list', '--since', 'yesterday'],
                                  ['list', '--since', '2026-13-01'],
                                  ['list', '--since', '2026-02-30 10:00'],
                                  ['list', '--client', '../x'],
                                  ['verify', '--bogus']])
def test_bad_tool_arguments_are_usage_errors(capsys, argv):
    assert nph_webjob.main(argv) == 2
    assert 'Usage:' in capsys.readouterr().err


def test_list_into_a_closed_pipe_is_one_clear_line(server_root):
    """'list | head' when the reader has gone: no traceback."""
    assert put(make_site(server_root))[0] == 200
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, NPH_WEBJOB, 'list', '--root',
                                 str(server_root)], stdout=write_end,
                                stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        'nph_webjob: stdout: the reader went away (broken pipe)']
