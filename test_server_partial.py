"""Partial uploads (the resumable and streamed extension) in nph_webjob.py,
driven in-process: an environ dict and a body that may end early, as a cut
connection leaves it.  Every trial ends with the group stored exactly once,
byte for byte, and `verify` clean, or with the partial held and visible.
"""

import hashlib
import io
import itertools
import os
import random

import pytest

import nph_webjob
from test_server import incoming, make_site, query

KEY = 'a' * 32
OUT = bytes(random.Random(1).getrandbits(8) for _ in range(3000))
ERR = b'warning: partial\n' * 7
SEED = 16                       # fixed: the same cut points on every run


def env_record(out=OUT, err=ERR, hash_type='MD5'):
    """A .env that declares the hashes of out and err, as webjob.py does."""
    name = hash_type.lower()
    return ('Version=webjob 1.0.0 ssl dsv 64 bit\nJid=x\nHashType=%s\n'
            'StdOutHash=%s\nStdErrHash=%s\n' % (
                hash_type, hashlib.new(name, out).hexdigest(),
                hashlib.new(name, err).hexdigest())).encode()


ENV = env_record()


@pytest.fixture
def site(tmp_path):
    root = tmp_path / 'server'
    for sub in ('incoming', 'logfiles', 'profiles'):
        (root / sub).mkdir(parents=True)
    serials = itertools.count(1)     # one process, many requests: serve's
    return make_site(root, next_serial=lambda: next(serials),
                     PartialUploadEnable=True)


def request(site, method, body=b'', lengths=None, stream=None, offset=None,
            complete=None, key=KEY, declared=None, **environ):
    """One HEAD or PATCH through handle_request; (status, fields dict).

    declared is the Content-Length sent (default: len(body)); a shorter
    body is a cut connection."""
    env = {'REQUEST_METHOD': method, 'REMOTE_ADDR': '192.0.2.7',
           'QUERY_STRING': query(lengths=lengths),
           'CONTENT_LENGTH': str(len(body) if declared is None else declared),
           'HTTP_UPLOAD_KEY': key}
    if stream is not None:
        env['HTTP_UPLOAD_STREAM'] = stream
    if offset is not None:
        env['HTTP_UPLOAD_OFFSET'] = str(offset)
    if complete is not None:
        env['HTTP_UPLOAD_COMPLETE'] = '?1' if complete else '?0'
    env.update(environ)
    out = io.BytesIO()
    status = nph_webjob.handle_request(env, io.BytesIO(body), out, site)
    head = out.getvalue().split(b'\r\n\r\n')[0].decode('latin-1')
    fields = dict((line.split(':', 1)[0].lower(), line.split(':', 1)[1]
                   .strip()) for line in head.split('\r\n')[1:])
    return status, fields


def lengths_of(out=OUT, err=ERR, env=ENV):
    return (len(out), len(err), len(env))


def groups(site):
    return [name for name in incoming(site.base) if not name.startswith('.')]


def stored(site, ext):
    names = [n for n in groups(site) if n.endswith('.' + ext)]
    assert len(names) == 1, names
    with open(os.path.join(site.incoming, names[0]), 'rb') as handle:
        return handle.read()


def verify(site):
    out = io.StringIO()
    problems = nph_webjob.verify_locker(site.base, out)
    return problems, out.getvalue()


def assert_stored_once(site, out=OUT, err=ERR, env=ENV):
    assert len(groups(site)) == 4, groups(site)
    assert (stored(site, 'out'), stored(site, 'err'), stored(site, 'env')) \
        == (out, err, env)
    problems, text = verify(site)
    assert problems == 0, text


def test_off_by_default_a_head_is_405(tmp_path):
    root = tmp_path / 'server'
    for sub in ('incoming', 'logfiles', 'profiles'):
        (root / sub).mkdir(parents=True)
    status, fields = request(make_site(root), 'HEAD', lengths=lengths_of())
    assert status == 405 and 'upload-offset' not in fields


def test_head_of_a_new_upload_answers_offset_zero(site):
    status, fields = request(site, 'HEAD', lengths=lengths_of())
    assert (status, fields['upload-offset']) == (204, '0')
    assert not os.path.exists(os.path.join(site.incoming, '.partial'))


def test_one_patch_with_upload_complete_stores_the_group(site):
    body = OUT + ERR + ENV
    status, fields = request(site, 'PATCH', body, lengths_of(), offset=0,
                             complete=True)
    assert status == 200 and fields['upload-complete'] == '?1'
    assert fields['job-id']
    assert_stored_once(site)


def test_a_patch_at_the_wrong_offset_is_409_with_the_right_one(site):
    body = OUT + ERR + ENV
    request(site, 'PATCH', body[:100], lengths_of(), offset=0)
    status, fields = request(site, 'PATCH', body[50:], lengths_of(),
                             offset=50, complete=True)
    assert (status, fields['upload-offset']) == (409, '100')
    assert groups(site) == []


def test_the_completing_patch_sent_again_is_already_stored(site):
    """Its answer was lost: the same PATCH again is 200, not a second
    group."""
    body = OUT + ERR + ENV
    request(site, 'PATCH', body, lengths_of(), offset=0, complete=True)
    status, fields = request(site, 'PATCH', b'', lengths_of(),
                             offset=len(body), complete=True)
    assert status == 200 and fields['upload-complete'] == '?1'
    status, fields = request(site, 'HEAD', lengths=lengths_of())
    assert status == 204 and fields['upload-complete'] == '?1'
    assert_stored_once(site)


def test_a_partial_is_no_group_and_verify_reports_it(site):
    body = OUT + ERR + ENV
    request(site, 'PATCH', body[:1234], lengths_of(), offset=0)
    assert groups(site) == []
    problems, text = verify(site)
    assert problems == 1 and 'partial upload, not a group: 1234 bytes' in text


def test_a_patch_longer_than_the_declared_lengths_is_refused(site):
    body = OUT + ERR + ENV
    status, fields = request(site, 'PATCH', body + b'x', lengths_of(),
                             offset=0, complete=True)
    assert status == 456 and groups(site) == []


@pytest.mark.parametrize('field, value', [
    ('HTTP_UPLOAD_KEY', '../../etc'), ('HTTP_UPLOAD_KEY', 'A' * 32),
    ('HTTP_UPLOAD_OFFSET', '-1'), ('HTTP_UPLOAD_STREAM', 'env'),
    ('HTTP_UPLOAD_COMPLETE', 'yes')])
def test_bad_upload_fields_are_450_and_write_nothing(site, field, value):
    status, fields = request(site, 'PATCH', b'abc', lengths_of(), offset=0,
                             **{field: value})
    assert status == 450
    assert os.listdir(site.incoming) == []


def test_a_linktest_is_refused_it_is_a_plain_put(site):
    env = dict(QUERY_STRING=query(lengths=lengths_of(), runtype='linktest'))
    status, fields = request(site, 'PATCH', OUT + ERR + ENV, lengths_of(),
                             offset=0, complete=True, **env)
    assert status == 450 and os.listdir(site.incoming) == []


def test_mismatching_hashes_are_stored_and_flagged(site):
    env = env_record(out=b'something else')
    body = OUT + ERR + env
    status, fields = request(site, 'PATCH', body, lengths_of(env=env),
                             offset=0, complete=True)
    assert status == 200
    assert len([n for n in groups(site) if n.endswith('.bad')]) == 1


def test_streams_appended_apart_then_completed_by_the_env(site):
    """The streamed form: out and err in segments while the program runs,
    then the env with the three lengths completes the group."""
    for start in range(0, len(OUT), 1000):
        status, fields = request(site, 'PATCH', OUT[start:start + 1000],
                                 stream='out', offset=start)
        assert status == 204
    request(site, 'PATCH', ERR, stream='err', offset=0)
    status, fields = request(site, 'HEAD', stream='out')
    assert fields['upload-offset'] == str(len(OUT))
    status, fields = request(site, 'PATCH', ENV, lengths_of(),
                             offset=len(OUT) + len(ERR), complete=True)
    assert status == 200
    assert_stored_once(site)


def test_an_abandoned_partial_expires(site, tmp_path):
    request(site, 'PATCH', OUT[:10], stream='out', offset=0, key='b' * 32)
    folder = os.path.join(site.incoming, '.partial', 'client_1_' + 'b' * 32)
    old = site.clock() - 604801
    for name in os.listdir(folder) + ['']:
        os.utime(os.path.join(folder, name), (old, old))
    request(site, 'PATCH', OUT[:10], stream='out', offset=0)
    assert not os.path.exists(folder)
    assert verify(site)[0] == 1     # only the new one


def test_cut_at_random_byte_offsets_then_resumed(site):
    """120 cuts of the whole body, each resumed from the offset the HEAD
    answers: every upload ends stored once, byte for byte."""
    rand = random.Random(SEED)
    body = OUT + ERR + ENV
    for trial in range(120):
        key = '%032x' % rand.getrandbits(128)
        cuts = sorted(rand.randrange(len(body)) for _ in range(rand.randint(
            1, 3)))
        offset = 0
        for cut in cuts + [len(body)]:
            status, fields = request(site, 'HEAD', lengths=lengths_of(),
                                     key=key)
            assert int(fields['upload-offset']) == offset
            status, fields = request(site, 'PATCH', body[offset:max(cut,
                                                                    offset)],
                                     lengths_of(), offset=offset,
                                     complete=True, key=key,
                                     declared=len(body) - offset)
            offset = max(cut, offset)
        assert status == 200, (trial, cuts, fields)
    assert len(groups(site)) == 4 * 120
    problems, text = verify(site)
    assert problems == 0, text
    for ext, data in (('out', OUT), ('err', ERR), ('env', ENV)):
        for name in groups(site):
            if name.endswith('.' + ext):
                with open(os.path.join(site.incoming, name), 'rb') as handle:
                    assert handle.read() == data, name
