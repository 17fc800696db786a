"""DSV: the client's verifier (webjob.py: DER, PEM, X.509, RSA and DSA
verification, payload policy) and the signing tool that lives in the server
(nph_webjob.py dsvtool, also run as webjob-dsvtool: DER/PEM encoders,
AES-CBC, private keys, signing, key and certificate generation).

Keys and certificates are made by openssl; signatures are checked against
openssl in both directions.
"""

import base64
import glob
import hashlib
import io
import json
import os
import subprocess
import sys

import pytest

import nph_webjob
import webjob

HERE = os.path.dirname(os.path.abspath(__file__))
WEBJOB = os.path.join(HERE, 'webjob.py')
NPH_WEBJOB = os.path.join(HERE, 'nph_webjob.py')


# DSV: the verifier and the signing tool ######################################

WYCHEPROOF = os.path.join(HERE, '..', 'shared', 'vectors', 'wycheproof')
DSV_PYTHONS = sorted(glob.glob('/root/.pyenv/versions/3.*/bin/python'))
PASS = 'xyz'


@pytest.fixture(scope='session')
def wj():
    """The DSV sections are pure functions of webjob; tests call them."""
    return webjob


def openssl(*args, **kwargs):
    """Run openssl; return stdout bytes, failing the test on error."""
    result = subprocess.run(('openssl',) + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def read(path):
    with open(path, 'rb') as stream:
        return stream.read()


def write(path, data):
    with open(path, 'wb' if isinstance(data, bytes) else 'w') as stream:
        stream.write(data)
    return str(path)


def sign_b64(key, hash_name, payload):
    """openssl dgst -sign; return the base64 text a .sig file holds."""
    return base64.b64encode(openssl('dgst', '-' + hash_name, '-sign', key,
                                    payload)).decode() + '\n'


class Keys(object):
    """Paths of openssl-made keys, certificates and a payload."""


@pytest.fixture(scope='session')
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp('keys')
    k = Keys()
    k.dir = d
    k.payload = write(d / 'payload.bin', os.urandom(2 * 1024 * 1024 + 123))
    for bits in (2048, 3072, 4096):
        key = str(d / ('rsa%d.pem' % bits))
        openssl('genpkey', '-algorithm', 'RSA', '-pkeyopt',
                'rsa_keygen_bits:%d' % bits, '-out', key)
        setattr(k, 'rsa%d' % bits, key)
    openssl('genpkey', '-genparam', '-algorithm', 'DSA', '-pkeyopt',
            'dsa_paramgen_bits:2048', '-out', str(d / 'dsaparam.pem'))
    k.dsa2048 = str(d / 'dsa2048.pem')
    openssl('genpkey', '-paramfile', str(d / 'dsaparam.pem'), '-out',
            k.dsa2048)
    k.ec = str(d / 'ec.pem')
    openssl('genpkey', '-algorithm', 'EC', '-pkeyopt',
            'ec_paramgen_curve:P-256', '-out', k.ec)
    for name in ('rsa2048', 'rsa3072', 'rsa4096', 'dsa2048', 'ec'):
        key = getattr(k, name)
        setattr(k, name + '_crt', str(d / (name + '.crt')))
        openssl('req', '-x509', '-new', '-key', key, '-subj', '/CN=test',
                '-days', '1', '-sha256', '-out', getattr(k, name + '_crt'))
        setattr(k, name + '_pub', str(d / (name + '.pub')))
        openssl('pkey', '-in', key, '-pubout', '-out',
                getattr(k, name + '_pub'))
    forms = {'rsa_pkcs1': ('rsa', '-traditional'),
             'rsa_legacy': ('rsa', '-traditional', '-aes256', '-passout',
                            'pass:' + PASS),
             'rsa_legacy128': ('rsa', '-traditional', '-aes128', '-passout',
                               'pass:' + PASS),
             'rsa_pkcs8_enc': ('pkcs8', '-topk8', '-v2', 'aes256',
                               '-passout', 'pass:' + PASS),
             'dsa_openssl': ('dsa',),
             'dsa_legacy': ('dsa', '-aes256', '-passout', 'pass:' + PASS),
             'dsa_pkcs8_enc': ('pkcs8', '-topk8', '-v2', 'aes256',
                               '-passout', 'pass:' + PASS)}
    for name, args in forms.items():
        source = k.rsa2048 if name.startswith('rsa') else k.dsa2048
        setattr(k, name, str(d / (name + '.pem')))
        openssl(args[0], '-in', source, '-out', getattr(k, name), *args[1:])
    k.rsa_genpkey_enc = str(d / 'rsa_genpkey_enc.pem')
    openssl('genpkey', '-algorithm', 'RSA', '-pkeyopt', 'rsa_keygen_bits:1024',
            '-aes-256-cbc', '-pass', 'pass:' + PASS, '-out', k.rsa_genpkey_enc)
    return k


def spki_of_cert(wj, crt):
    return wj.x509_parse(wj.pem_decode_all(read(crt), 'CERTIFICATE')[0]
                         ).spki_der


# DER reader ##################################################################

@pytest.mark.parametrize('der', [
    b'\x30\x80\x00\x00',            # indefinite length
    b'\x04\x81\x01\x00',            # long form for a short length
    b'\x04\x82\x00\x81' + b'\x00' * 0x81,  # leading zero length octet
    b'\x1f\x01\x00',                # high-tag-number form
    b'\x04\x05\x00\x00',            # value runs past the end
    b'\x04',                        # no length octet
], ids=['indefinite', 'long-short', 'zero-octet', 'high-tag', 'truncated',
        'no-length'])
def test_der_read_tlv_rejects_non_der(wj, der):
    with pytest.raises(wj.DERError):
        wj.der_read_tlv(der, 0, len(der))


def test_der_read_tlv_respects_end_bound(wj):
    with pytest.raises(wj.DERError):
        wj.der_read_tlv(b'\x04\x02ab', 0, 3)


def test_der_read_tlv_accepts_long_form_at_128(wj):
    der = b'\x04\x81\x80' + b'x' * 128
    assert wj.der_read_tlv(der, 0, len(der)) == (4, 3, 131)


@pytest.mark.parametrize('der', [b'\x02\x02\x00\x01', b'\x02\x02\xff\x80',
                                 b'\x02\x00'])
def test_der_read_integer_rejects_non_minimal_or_empty(wj, der):
    with pytest.raises(wj.DERError):
        wj.der_read_integer(der, 0, len(der))


def test_der_read_integer_rejects_negative_unless_signed(wj):
    with pytest.raises(wj.DERError):
        wj.der_read_integer(b'\x02\x01\x80', 0, 3)
    assert wj.der_read_integer(b'\x02\x01\x80', 0, 3, signed=True) == (-128, 3)


@pytest.mark.parametrize('value', [0, 1, 127, 128, 255, 256, 2 ** 2048 - 1])
def test_der_integer_encoder_round_trips(wj, value):
    der = nph_webjob.der_encode_integer(value)
    assert wj.der_read_integer(der, 0, len(der)) == (value, len(der))


@pytest.mark.parametrize('oid', ['1.2.840.113549.1.1.11', '2.5.4.3',
                                 '2.999.1', '0.9.2342.19200300.100.1.25'])
def test_der_oid_encoder_round_trips(wj, oid):
    der = nph_webjob.der_encode_oid(oid)
    assert wj.der_read_oid(der, 0, len(der)) == (oid, len(der))


def test_der_read_oid_rejects_non_minimal_subidentifier(wj):
    with pytest.raises(wj.DERError):
        wj.der_read_oid(b'\x06\x03\x2a\x80\x01', 0, 5)


def test_der_read_bitstring_rejects_unused_bits(wj):
    with pytest.raises(wj.DERError):
        wj.der_read_bitstring(b'\x03\x02\x01\xfe', 0, 4)


def test_der_read_integer_sequence_rejects_trailing_data(wj):
    der = nph_webjob.der_encode_sequence(nph_webjob.der_encode_integer(1),
                                 nph_webjob.der_encode_integer(2))
    with pytest.raises(wj.DERError):
        wj.der_read_integer_sequence(der + b'\x00', 2)


# PEM #########################################################################

def test_pem_decode_all_returns_every_block_and_skips_text(wj):
    data = (b'junk\n' + nph_webjob.pem_encode(b'one', 'CERTIFICATE') + b'text\n' +
            nph_webjob.pem_encode(b'two', 'CERTIFICATE') +
            nph_webjob.pem_encode(b'key', 'PRIVATE KEY'))
    assert wj.pem_decode_all(data, 'CERTIFICATE') == [b'one', b'two']


@pytest.mark.parametrize('body', [b'QUJD*', b'QQ==QUJD', b'QR==', b'QUJ'])
def test_pem_decode_all_rejects_non_canonical_base64(wj, body):
    data = b'-----BEGIN X-----\n' + body + b'\n-----END X-----\n'
    with pytest.raises(wj.PEMError):
        wj.pem_decode_all(data, 'X')


def test_pem_decode_all_rejects_unterminated_block(wj):
    with pytest.raises(wj.PEMError):
        wj.pem_decode_all(b'-----BEGIN X-----\nQUJD\n', 'X')


def test_pem_decode_with_headers_returns_legacy_headers(wj, keys):
    [(headers, _)] = wj.pem_decode_with_headers(read(keys.rsa_legacy),
                                                'RSA PRIVATE KEY')
    assert headers['Proc-Type'] == '4,ENCRYPTED'
    assert headers['DEK-Info'].startswith('AES-256-CBC,')


# X.509 #######################################################################

def test_x509_parse_reads_openssl_certificate(wj, keys):
    cert = wj.x509_parse(wj.pem_decode_all(read(keys.rsa2048_crt),
                                           'CERTIFICATE')[0])
    assert cert.subject_cn == 'test'
    assert cert.subject_der == cert.issuer_der
    assert cert.sig_alg_oid == '1.2.840.113549.1.1.11'
    assert cert.not_after.endswith('Z')
    assert cert.spki_der == openssl('pkey', '-pubin', '-in', keys.rsa2048_pub,
                                    '-outform', 'DER')


def test_x509_parse_rejects_trailing_data(wj, keys):
    der = wj.pem_decode_all(read(keys.rsa2048_crt), 'CERTIFICATE')[0]
    with pytest.raises(wj.DERError):
        wj.x509_parse(der + b'\x00')


def test_x509_parse_decodes_utf8_common_name(wj, tmp_path, keys):
    crt = str(tmp_path / 'u.crt')
    openssl('req', '-x509', '-new', '-key', keys.rsa2048, '-utf8', '-subj',
            '/O=x/CN=t\u00ebst', '-days', '1', '-out', crt)
    cert = wj.x509_parse(wj.pem_decode_all(read(crt), 'CERTIFICATE')[0])
    assert cert.subject_cn == 't\u00ebst'


@pytest.mark.parametrize('key', ['rsa2048', 'dsa2048'])
def test_x509_verify_issued_by_accepts_self_signed(wj, keys, key):
    der = wj.pem_decode_all(read(getattr(keys, key + '_crt')), 'CERTIFICATE')
    cert = wj.x509_parse(der[0])
    assert wj.x509_verify_issued_by(cert, cert)


def test_x509_verify_issued_by_follows_a_ca_chain(wj, keys, tmp_path):
    csr, leaf = str(tmp_path / 'leaf.csr'), str(tmp_path / 'leaf.crt')
    openssl('req', '-new', '-key', keys.rsa3072, '-subj', '/CN=leaf', '-out',
            csr)
    openssl('x509', '-req', '-in', csr, '-CA', keys.dsa2048_crt, '-CAkey',
            keys.dsa2048, '-CAcreateserial', '-days', '1', '-sha256', '-out',
            leaf)
    ca = wj.x509_parse(wj.pem_decode_all(read(keys.dsa2048_crt),
                                         'CERTIFICATE')[0])
    child = wj.x509_parse(wj.pem_decode_all(read(leaf), 'CERTIFICATE')[0])
    assert child.issuer_der == ca.subject_der and child.subject_cn == 'leaf'
    assert wj.x509_verify_issued_by(child, ca)
    assert not wj.x509_verify_issued_by(ca, child)


def test_x509_verify_issued_by_rejects_other_key_same_name(wj, keys):
    a = wj.x509_parse(wj.pem_decode_all(read(keys.rsa2048_crt),
                                        'CERTIFICATE')[0])
    b = wj.x509_parse(wj.pem_decode_all(read(keys.rsa3072_crt),
                                        'CERTIFICATE')[0])
    assert not wj.x509_verify_issued_by(a, b)


# Wycheproof ##################################################################

def wycheproof_cases():
    """(file, tcId, spki hex, hash, msg hex, sig hex, result) for every case.

    ``acceptable`` cases are expected to FAIL: there is one per file, an RSA
    DigestInfo without the NULL parameters ("MissingNull") and a DSA r
    encoded without its leading zero, i.e. as a negative INTEGER
    ("MissingZero").  Both are non-canonical encodings; a strict verifier
    that rebuilds the encoding and reads DER strictly refuses them.
    """
    cases = []
    for path in sorted(glob.glob(os.path.join(WYCHEPROOF, '*.json'))):
        with open(path) as stream:
            data = json.load(stream)
        for group in data['testGroups']:
            hash_name = group['sha'].replace('-', '').lower()
            for test in group['tests']:
                cases.append(pytest.param(
                    group['publicKeyDer'], hash_name, test['msg'], test['sig'],
                    test['result'], id='%s-%d' % (
                        os.path.basename(path)[:-10], test['tcId'])))
    return cases


@pytest.mark.parametrize('spki,hash_name,msg,sig,result', wycheproof_cases())
def test_wycheproof_vector(wj, spki, hash_name, msg, sig, result):
    args = (bytes.fromhex(spki), hash_name, bytes.fromhex(msg),
            bytes.fromhex(sig))
    if result == 'valid':
        assert wj.verify_signature(*args) is None
    else:
        with pytest.raises(wj.SignatureError) as info:
            wj.verify_signature(*args)
        assert str(info.value) == 'signature verification failed'


def test_wycheproof_files_are_all_present():
    assert len(glob.glob(os.path.join(WYCHEPROOF, '*.json'))) == 5
    assert len(wycheproof_cases()) == 366 + 4 * 259


# Signature primitive #########################################################

@pytest.mark.parametrize('q', [0, 2 ** 255 + 1])
def test_spki_parse_rejects_bad_dsa_subprime(wj, q):
    enc = nph_webjob.der_encode_integer
    p = 2 ** 2047 + 1  # any 2048-bit odd number: the q checks come first
    spki = nph_webjob.der_encode_sequence(
        nph_webjob.der_encode_sequence(nph_webjob.der_encode_oid(wj.OID_DSA),
                               nph_webjob.der_encode_sequence(enc(p), enc(q), enc(2))),
        nph_webjob.der_encode_tlv(0x03, b'\x00' + enc(3)))
    with pytest.raises(wj.DERError):
        wj.spki_parse(spki)


def test_verify_signature_rejects_unknown_hash(wj, keys):
    spki = spki_of_cert(wj, keys.rsa2048_crt)
    sig = openssl('dgst', '-md5', '-sign', keys.rsa2048, keys.payload)
    with pytest.raises(wj.SignatureError):
        wj.verify_signature(spki, 'md5', read(keys.payload), sig)


def test_verify_signature_rejects_garbage_key(wj):
    with pytest.raises(wj.SignatureError):
        wj.verify_signature(b'\x30\x00', 'sha256', b'm', b'\x00' * 256)


def test_verify_signature_rejects_signature_equal_to_modulus(wj, keys):
    spki = spki_of_cert(wj, keys.rsa2048_crt)
    n = wj.spki_parse(spki)[1][0]
    with pytest.raises(wj.SignatureError) as info:
        wj.verify_signature(spki, 'sha256', b'm', n.to_bytes(256, 'big'))
    assert str(info.value) == 'signature verification failed'


def test_verify_signature_digest_matches_verify_signature(wj, keys):
    spki = spki_of_cert(wj, keys.dsa2048_crt)
    sig = openssl('dgst', '-sha256', '-sign', keys.dsa2048, keys.payload)
    digest = hashlib.sha256(read(keys.payload)).digest()
    assert wj.verify_signature_digest(spki, 'sha256', digest, sig) is None


# Payload policy ##############################################################

@pytest.mark.parametrize('key', ['rsa2048', 'rsa3072', 'rsa4096', 'dsa2048'])
@pytest.mark.parametrize('hash_name', ['sha256', 'sha384', 'sha512'])
def test_verify_payload_file_accepts_openssl_signature(wj, keys, key,
                                                       hash_name):
    sig = sign_b64(getattr(keys, key), hash_name, keys.payload)
    tree = wj.load_certificate_tree(str(keys.dir))
    assert wj.verify_payload_file(keys.payload, sig, tree) is None


@pytest.mark.parametrize('key', ['rsa2048', 'dsa2048'])
def test_verify_payload_file_refuses_sha1_by_default(wj, keys, key):
    sig = sign_b64(getattr(keys, key), 'sha1', keys.payload)
    spki = spki_of_cert(wj, getattr(keys, key + '_crt'))
    with pytest.raises(wj.SignatureError):
        wj.verify_payload_file(keys.payload, sig, [spki])
    assert wj.verify_payload_file(keys.payload, sig, [spki],
                                  allow_sha1=True) is None


@pytest.mark.parametrize('key', ['rsa2048', 'dsa2048'])
def test_verify_payload_file_rejects_tampered_payload(wj, keys, key, tmp_path):
    sig = sign_b64(getattr(keys, key), 'sha256', keys.payload)
    data = bytearray(read(keys.payload))
    data[-1] ^= 1
    tampered = write(tmp_path / 'tampered', bytes(data))
    with pytest.raises(wj.SignatureError):
        wj.verify_payload_file(tampered, sig, [spki_of_cert(
            wj, getattr(keys, key + '_crt'))])


@pytest.mark.parametrize('key', ['rsa2048', 'dsa2048'])
def test_verify_payload_file_rejects_tampered_signature(wj, keys, key):
    raw = bytearray(base64.b64decode(sign_b64(getattr(keys, key), 'sha256',
                                              keys.payload)))
    raw[len(raw) // 2] ^= 0x40
    with pytest.raises(wj.SignatureError):
        wj.verify_payload_file(keys.payload, base64.b64encode(bytes(raw)),
                               [spki_of_cert(wj, getattr(keys, key + '_crt'))])


def test_verify_payload_file_rejects_wrong_certificate(wj, keys):
    sig = sign_b64(keys.rsa2048, 'sha256', keys.payload)
    others = [spki_of_cert(wj, getattr(keys, name + '_crt'))
              for name in ('rsa3072', 'rsa4096', 'dsa2048')]
    with pytest.raises(wj.SignatureError):
        wj.verify_payload_file(keys.payload, sig, others)


def test_verify_payload_file_rejects_empty_key_list(wj, keys):
    sig = sign_b64(keys.rsa2048, 'sha256', keys.payload)
    with pytest.raises(wj.SignatureError):
        wj.verify_payload_file(keys.payload, sig, [])


@pytest.mark.parametrize('mangle', [lambda s: s.replace('A', '*', 1),
                                    lambda s: s[:10] + '\n' + s[10:],
                                    lambda s: s.rstrip() + '==',
                                    lambda s: '\u00e9' + s],
                         ids=['bad-char', 'inner-newline', 'extra-pad',
                              'non-ascii'])
def test_verify_payload_file_rejects_non_canonical_base64(wj, keys, mangle):
    sig = sign_b64(keys.rsa2048, 'sha256', keys.payload)
    with pytest.raises(wj.SignatureError):
        wj.verify_payload_file(keys.payload, mangle(sig),
                               [spki_of_cert(wj, keys.rsa2048_crt)])


def test_verify_payload_file_trims_surrounding_whitespace(wj, keys):
    sig = sign_b64(keys.rsa2048, 'sha256', keys.payload)
    assert wj.verify_payload_file(keys.payload, '  \r\n' + sig + ' \r\n',
                                  [spki_of_cert(wj, keys.rsa2048_crt)]) is None


def test_verify_payload_file_reports_missing_payload_as_dsv_error(wj, keys,
                                                                  tmp_path):
    sig = sign_b64(keys.rsa2048, 'sha256', keys.payload)
    with pytest.raises(wj.DsvError) as info:
        wj.verify_payload_file(str(tmp_path / 'missing'), sig,
                               [spki_of_cert(wj, keys.rsa2048_crt)])
    assert not isinstance(info.value, wj.SignatureError)


# Certificate tree ############################################################

def test_load_certificate_tree_empty_returns_empty_list(wj, tmp_path):
    assert wj.load_certificate_tree(str(tmp_path)) == []


def test_load_certificate_tree_skips_junk_files(wj, tmp_path, keys):
    write(tmp_path / 'random.bin', os.urandom(4096))
    write(tmp_path / 'text.txt', 'hello\n')
    write(tmp_path / 'badb64.pem',
          '-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n')
    write(tmp_path / 'badder.pem', nph_webjob.pem_encode(b'\x30\x00', 'CERTIFICATE'))
    write(tmp_path / 'key.pem', read(keys.rsa2048))
    write(tmp_path / 'ec.crt', read(keys.ec_crt))
    write(tmp_path / 'huge.crt', b'#' * (1 << 20) + read(keys.rsa2048_crt))
    os.mkfifo(str(tmp_path / 'fifo.crt'))
    os.symlink(str(tmp_path / 'nowhere'), str(tmp_path / 'dangling.crt'))
    assert wj.load_certificate_tree(str(tmp_path)) == []


def test_load_certificate_tree_ignores_subfolders(wj, tmp_path, keys):
    os.mkdir(str(tmp_path / 'sub'))
    write(tmp_path / 'sub' / 'a.crt', read(keys.rsa2048_crt))
    assert wj.load_certificate_tree(str(tmp_path)) == []


def test_load_certificate_tree_reads_every_block_of_a_file(wj, tmp_path, keys):
    write(tmp_path / 'both.crt', read(keys.rsa2048_crt) + b'\n' +
          read(keys.dsa2048_crt))
    assert wj.load_certificate_tree(str(tmp_path)) == [
        spki_of_cert(wj, keys.rsa2048_crt), spki_of_cert(wj, keys.dsa2048_crt)]


def test_load_certificate_tree_missing_folder_is_dsv_error(wj, tmp_path):
    with pytest.raises(wj.DsvError):
        wj.load_certificate_tree(str(tmp_path / 'missing'))


# AES #########################################################################

@pytest.mark.parametrize('key_len,cipher', [
    (16, '69c4e0d86a7b0430d8cdb78070b4c55a'),
    (24, 'dda97ca4864cdfe06eaf70a0ec0d7191'),
    (32, '8ea2b7ca516745bfeafc49904b496089')])
def test_aes_decrypt_block_fips197_appendix_c(wj, key_len, cipher):
    tables = nph_webjob.aes_build_tables()
    rounds = nph_webjob.aes_decryption_key_schedule(bytes(range(key_len)), tables)
    assert nph_webjob.aes_decrypt_block(bytes.fromhex(cipher), rounds, tables) == (
        bytes.fromhex('00112233445566778899aabbccddeeff'))


@pytest.mark.parametrize('key_len', [16, 24, 32])
def test_aes_cbc_decrypt_matches_openssl_enc(wj, tmp_path, key_len):
    key, iv, plain = os.urandom(key_len), os.urandom(16), os.urandom(1000)
    cipher = openssl('enc', '-aes-%d-cbc' % (8 * key_len), '-K', key.hex(),
                     '-iv', iv.hex(), input=plain)
    assert nph_webjob.pkcs7_unpad(nph_webjob.aes_cbc_decrypt(key, iv, cipher)) == plain


def test_pkcs7_unpad_rejects_bad_padding(wj):
    with pytest.raises(nph_webjob.KeyFileError):
        nph_webjob.pkcs7_unpad(b'x' * 14 + b'\x01\x02')


# Private keys ################################################################

@pytest.mark.parametrize('form', ['rsa2048', 'rsa_pkcs1', 'rsa_legacy',
                                  'rsa_legacy128', 'rsa_pkcs8_enc', 'dsa2048',
                                  'dsa_openssl', 'dsa_legacy',
                                  'dsa_pkcs8_enc'])
def test_load_private_key_reads_openssl_forms(wj, keys, form):
    kind, key = nph_webjob.load_private_key(read(getattr(keys, form)),
                                    lambda: PASS.encode())
    pub = getattr(keys, kind + '2048_pub')
    der = openssl('pkey', '-pubin', '-in', pub, '-outform', 'DER')
    assert wj.spki_parse(der) == (kind, key[:2] if kind == 'rsa' else key[:4])


def test_load_private_key_reads_genpkey_encrypted_pkcs8(wj, keys):
    kind, key = nph_webjob.load_private_key(read(keys.rsa_genpkey_enc),
                                    lambda: PASS.encode())
    assert kind == 'rsa' and key[0].bit_length() == 1024


@pytest.mark.parametrize('form', ['rsa_legacy', 'rsa_pkcs8_enc', 'dsa_legacy',
                                  'dsa_pkcs8_enc', 'rsa_genpkey_enc'])
def test_load_private_key_wrong_passphrase_is_key_file_error(wj, keys, form):
    with pytest.raises(nph_webjob.KeyFileError) as info:
        nph_webjob.load_private_key(read(getattr(keys, form)), lambda: b'wrong')
    assert 'passphrase' in str(info.value)


def test_load_private_key_plain_key_never_asks_passphrase(wj, keys):
    def refuse():
        raise AssertionError('asked')
    assert nph_webjob.load_private_key(read(keys.rsa_pkcs1), refuse)[0] == 'rsa'


def test_load_private_key_rejects_certificate_only_file(wj, keys):
    with pytest.raises(nph_webjob.KeyFileError):
        nph_webjob.load_private_key(read(keys.rsa2048_crt), lambda: b'')


def test_load_private_key_rejects_ec_key(wj, keys):
    with pytest.raises(nph_webjob.KeyFileError):
        nph_webjob.load_private_key(read(keys.ec), lambda: b'')


# Signing #####################################################################

RFC6979_A21 = dict(  # RFC 6979 appendix A.2.1, DSA 1024 bits
    p=int('86F5CA03DCFEB225063FF830A0C769B9DD9D6153AD91D7CE27F787C43278B447'
          'E6533B86B18BED6E8A48B784A14C252C5BE0DBF60B86D6385BD2F12FB763ED88'
          '73ABFD3F5BA2E0A8C0A59082EAC056935E529DAF7C610467899C77ADEDFC846C'
          '881870B7B19B2B58F9BE0521A17002E3BDD6B86685EE90B3D9A1B02B782B1779',
          16),
    q=int('996F967F6C8E388D9E28D01E205FBA957A5698B1', 16),
    g=int('07B0F92546150B62514BB771E2A0C0CE387F03BDA6C56B505209FF25FD3C133D'
          '89BBCD97E904E09114D9A7DEFDEADFC9078EA544D2E401AEECC40BB9FBBF78FD'
          '87995A10A1C27CB7789B594BA7EFB5C4326A9FE59A070E136DB77175464ADCA4'
          '17BE5DCE2F40D10A46A3A3943F26AB7FD9C0398FF8C76EE0A56826A8A88F1DBD',
          16),
    x=int('411602CB19A6CCC34494D79D98EF1E7ED5AF25F7', 16))


@pytest.mark.parametrize('hash_name,message,k,r,s', [
    ('sha1', b'sample', '7BDB6B0FF756E1BB5D53583EF979082F9AD5BD5B',
     '2E1A0C2562B2912CAAF89186FB0F42001585DA55',
     '29EFB6B0AFF2D7A68EB70CA313022253B9A88DF5'),
    ('sha256', b'sample', '519BA0546D0C39202A7D34D7DFA5E760B318BCFB',
     '81F2F5850BE5BC123C43F71A3033E9384611C545',
     '4CDD914B65EB6C66A8AAAD27299BEE6B035F5E89'),
    ('sha512', b'test', '65D2C2EEB175E370F28C75BFCDC028D22C7DBE9C',
     '8EA47E475BA8AC6F2D821DA3BD212D11A3DEB9A0',
     '7C670C7AD72B6C050C109E1790008097125433E8')])
def test_dsa_sign_matches_rfc6979_vectors(wj, hash_name, message, k, r, s):
    v = RFC6979_A21
    y = pow(v['g'], v['x'], v['p'])
    digest = hashlib.new(hash_name, message).digest()
    nonces = nph_webjob.rfc6979_nonces(v['x'], v['q'], hash_name, digest)
    assert next(nonces) == int(k, 16)
    sig = nph_webjob.dsa_sign((v['p'], v['q'], v['g'], y, v['x']), hash_name, digest)
    assert wj.dsa_decode_signature(sig) == (int(r, 16), int(s, 16))


def test_mod_inverse_matches_definition(wj):
    assert nph_webjob.mod_inverse(65537, 2 ** 127 - 2) * 65537 % (2 ** 127 - 2) == 1
    with pytest.raises(ValueError):
        nph_webjob.mod_inverse(6, 9)


# dsvtool #####################################################################

def run_tool(wj, *argv, **kwargs):
    """Run dsvtool_main in-process; return (code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = nph_webjob.dsvtool_main(list(argv), stdin=kwargs.get('stdin', io.BytesIO()),
                           stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope='session')
def generated(wj, tmp_path_factory):
    """A key pair made by the tool itself (2048 bits)."""
    prefix = str(tmp_path_factory.mktemp('gen') / 'signer')
    code, out, err = run_tool(wj, '-g', '-b', '2048', '-t', 'rsa', '-n',
                              'webjob-t\u00ebst', '-o', prefix)
    assert (code, out, err) == (0, '', '')
    return prefix


@pytest.mark.parametrize('key', ['rsa_pkcs1', 'dsa_openssl'])
def test_dsvtool_signature_verifies_with_openssl(wj, keys, tmp_path, key):
    payload = write(tmp_path / 'p.txt', read(keys.payload))
    assert run_tool(wj, '-s', '-k', getattr(keys, key), payload)[0] == 0
    raw = write(tmp_path / 'p.raw', base64.b64decode(read(payload + '.sig')))
    assert read(payload + '.sig').endswith(b'\n')
    assert read(payload + '.sig').count(b'\n') == 1
    pub = getattr(keys, key[:3] + '2048_pub')
    assert b'Verified OK' in openssl('dgst', '-sha256', '-verify', pub,
                                     '-signature', raw, payload)


def test_dsvtool_sign_honours_hash_option(wj, keys, tmp_path):
    payload = write(tmp_path / 'p', b'data')
    assert run_tool(wj, '-s', '-k', keys.dsa_openssl, '-a', 'sha512',
                    payload)[0] == 0
    raw = write(tmp_path / 'p.raw', base64.b64decode(read(payload + '.sig')))
    assert b'Verified OK' in openssl('dgst', '-sha512', '-verify',
                                     keys.dsa2048_pub, '-signature', raw,
                                     payload)


def test_dsvtool_sign_stdin_writes_line_to_stdout(wj, keys, tmp_path):
    payload = write(tmp_path / 'p', b'stdin payload')
    code, out, _ = run_tool(wj, '-s', '-k', keys.rsa_pkcs1, '-',
                            stdin=io.BytesIO(b'stdin payload'))
    assert code == 0 and out.endswith('\n') and out.count('\n') == 1
    assert run_tool(wj, '-s', '-k', keys.rsa_pkcs1, payload)[0] == 0
    assert out == read(payload + '.sig').decode()  # PKCS#1 v1.5: same bytes


def test_dsvtool_sign_reads_passphrase_from_environment(wj, keys, tmp_path,
                                                        monkeypatch):
    payload = write(tmp_path / 'p', b'x')
    monkeypatch.setenv('DSV_PASSPHRASE', PASS)
    assert run_tool(wj, '-s', '-k', keys.rsa_pkcs8_enc, payload)[0] == 0
    assert os.path.exists(payload + '.sig')


def test_dsvtool_sign_without_passphrase_source_fails_cleanly(
        wj, keys, tmp_path, monkeypatch):
    monkeypatch.delenv('DSV_PASSPHRASE', raising=False)
    code, _, err = run_tool(wj, '-s', '-k', keys.rsa_legacy,
                            write(tmp_path / 'p', b'x'))
    assert code == 1 and 'DSV_PASSPHRASE' in err and err.count('\n') == 1


def test_dsvtool_sign_wrong_passphrase_fails_cleanly(wj, keys, tmp_path,
                                                     monkeypatch):
    monkeypatch.setenv('DSV_PASSPHRASE', 'nope')
    code, _, err = run_tool(wj, '-s', '-k', keys.dsa_pkcs8_enc,
                            write(tmp_path / 'p', b'x'))
    assert code == 1 and err.startswith('webjob-dsvtool: ')
    assert 'nope' not in err and 'Traceback' not in err


def test_dsvtool_check_reports_ok_and_failed(wj, keys, tmp_path):
    good = write(tmp_path / 'good', b'good')
    bad = write(tmp_path / 'bad', b'bad')
    for payload in (good, bad):
        write(payload + '.sig', sign_b64(keys.rsa3072, 'sha256', payload))
    write(bad, b'tampered')
    code, out, _ = run_tool(wj, '-c', '-f', keys.rsa3072_crt, good + '.sig',
                            bad + '.sig')
    assert code == 1
    assert out == '%s.sig: OK\n%s.sig: FAILED\n' % (good, bad)


def test_dsvtool_check_with_tree_accepts_sha1(wj, keys, tmp_path):
    payload = write(tmp_path / 'p', b'old signature')
    write(payload + '.sig', sign_b64(keys.dsa2048, 'sha1', payload))
    code, out, _ = run_tool(wj, '-c', '-t', str(keys.dir), payload + '.sig')
    assert (code, out) == (0, payload + '.sig: OK\n')


def test_dsvtool_check_without_certificate_fails(wj, keys, tmp_path):
    code, _, err = run_tool(wj, '-c', '-t', str(tmp_path), 'x.sig')
    assert code == 1 and 'no usable certificate' in err


def test_dsvtool_check_missing_payload_is_failed(wj, keys, tmp_path):
    sig = write(tmp_path / 'gone.sig', sign_b64(keys.rsa2048, 'sha256',
                                                keys.payload))
    code, out, err = run_tool(wj, '-c', '-f', keys.rsa2048_crt, sig)
    assert (code, out) == (1, sig + ': FAILED\n') and 'gone' in err


def test_dsvtool_generated_key_passes_openssl_rsa_check(generated):
    assert b'RSA key ok' in openssl('rsa', '-check', '-noout', '-in',
                                    generated + '.key')
    assert os.stat(generated + '.key').st_mode & 0o777 == 0o600


def test_dsvtool_generated_certificate_verifies_with_openssl(generated):
    text = openssl('x509', '-noout', '-text', '-in', generated + '.crt')
    assert b'sha256WithRSAEncryption' in text
    assert b'Public-Key: (2048 bit)' in text
    assert b'OK' in openssl('verify', '-CAfile', generated + '.crt',
                            generated + '.crt')


def test_dsvtool_generated_certificate_matches_key(wj, generated):
    cert = wj.x509_parse(wj.pem_decode_all(read(generated + '.crt'),
                                           'CERTIFICATE')[0])
    kind, key = nph_webjob.load_private_key(read(generated + '.key'), None)
    assert wj.spki_parse(cert.spki_der) == (kind, key[:2])
    assert cert.subject_cn == 'webjob-t\u00ebst'
    assert wj.x509_verify_issued_by(cert, cert)


def test_dsvtool_generated_key_signs_and_checks(wj, generated, tmp_path):
    payload = write(tmp_path / 'p', b'payload')
    assert run_tool(wj, '-s', '-k', generated + '.key', payload)[0] == 0
    assert run_tool(wj, '-c', '-f', generated + '.crt', payload + '.sig') == (
        0, payload + '.sig: OK\n', '')


def test_dsvtool_generate_key_refuses_to_overwrite(wj, generated):
    before = read(generated + '.key')
    code, _, err = run_tool(wj, '-g', '-b', '1024', '-t', 'rsa', '-o',
                            generated)
    assert code == 1 and 'exists' in err and read(generated + '.key') == before


def test_rsa_generate_key_has_exact_size_and_valid_crt(wj):
    n, e, d, p, q, dp, dq, qinv = nph_webjob.rsa_generate_key(1024)
    assert n.bit_length() == 1024 and n == p * q and e == 65537
    assert pow(pow(12345, e, n), d, n) == 12345 and qinv * q % p == 1


def test_dsvtool_generate_password_default_length_and_alphabet(wj):
    code, out, _ = run_tool(wj, '-p')
    assert code == 0 and len(out) == 21 and out[:-1].isalnum()
    assert run_tool(wj, '-p', '-l', '64')[1] != run_tool(wj, '-p', '-l',
                                                         '64')[1]


def test_dsvtool_version(wj):
    assert run_tool(wj, '-v') == (0, 'webjob-dsvtool 1.0.0\n', '')


@pytest.mark.parametrize('argv', [
    [], ['-x'], ['-sk', 'key', 'p'], ['-s', '-k'], ['-s', '-k', 'key'],
    ['-s', '-a', 'sha256', '-k', 'key', 'p'],
    ['-s', '-k', 'k', '-a', 'md5', 'p'],
    ['-c', 'x.sig'], ['-c', '-f', 'cert'], ['-g', '-b', '1000', '-t', 'rsa'],
    ['-g', '-b', '2048', '-t', 'dsa'], ['-g', '-t', 'rsa', '-b', '2048'],
    ['-g', '-b', '2048', '-t', 'rsa', '-o', 'x', '-n', 'y'],
    ['-p', '-l', '3'], ['-p', '-l', 'ten'], ['-v', 'extra']])
def test_dsvtool_usage_errors_exit_2(wj, argv):
    code, out, err = run_tool(wj, *argv)
    assert code == 2 and out == '' and err.startswith('webjob-dsvtool: ')
    assert 'Usage:' in err


# Whole program under every interpreter #######################################

@pytest.fixture(scope='session')
def script(tmp_path_factory):
    """nph_webjob.py reached under a webjob-dsvtool name, as the original's
    tool."""
    path = tmp_path_factory.mktemp('script') / 'webjob-dsvtool'
    os.symlink(NPH_WEBJOB, str(path))
    return str(path)


@pytest.mark.parametrize('python', DSV_PYTHONS, ids=lambda p: p.split('/')[-3])
def test_script_signs_and_checks_under_every_python(script, keys, tmp_path,
                                                    python):
    payload = write(tmp_path / 'p', os.urandom(3000))
    other = write(tmp_path / 'q', os.urandom(3000))
    env = dict(os.environ, DSV_PASSPHRASE=PASS)
    for argv in (['-s', '-k', keys.rsa_pkcs8_enc, payload],
                 ['-s', '-k', keys.dsa_legacy, '-a', 'sha384', other],
                 ['-c', '-t', str(keys.dir), payload + '.sig',
                  other + '.sig']):
        result = subprocess.run([python, script] + argv, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert (result.returncode, result.stderr) == (0, b''), argv
    assert result.stdout == ('%s.sig: OK\n%s.sig: OK\n' % (payload, other)
                             ).encode()


# Where the tool lives ########################################################

def run_python(argv, **kwargs):
    return subprocess.run([sys.executable] + argv, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120, **kwargs)


def test_client_carries_no_signing_code():
    for name in ('dsvtool_main', 'load_private_key', 'dsa_sign',
                 'rsa_pkcs1v15_sign', 'rsa_generate_key', 'aes_cbc_decrypt',
                 'der_encode_tlv', 'pem_encode', 'KeyFileError'):
        assert not hasattr(webjob, name), name
        assert hasattr(nph_webjob, name), name


@pytest.mark.parametrize('argv', [['--dsvtool'], ['--dsvtool', '-v'],
                                  ['--dsvtool', '-s', '-k', 'key', 'p']])
def test_client_dsvtool_mode_says_where_the_tool_went(argv):
    result = run_python([WEBJOB] + argv)
    err = result.stderr.decode()
    assert result.returncode == webjob.XER_CHECK_DEPENDENCIES == 6
    assert err.count('\n') == 1 and err.startswith('webjob: ')
    assert 'nph_webjob.py dsvtool' in err and result.stdout == b''


def test_client_linked_as_dsvtool_says_where_the_tool_went(tmp_path):
    link = tmp_path / 'webjob-dsvtool'
    os.symlink(WEBJOB, str(link))
    result = run_python([str(link), '-v'])
    assert result.returncode == 6 and result.stdout == b''
    assert 'nph_webjob.py dsvtool' in result.stderr.decode()


def test_server_dsvtool_command_runs_the_tool():
    result = run_python([NPH_WEBJOB, 'dsvtool', '-v'])
    assert (result.returncode, result.stdout, result.stderr) == (
        0, b'webjob-dsvtool 1.0.0\n', b'')


def test_server_dsvtool_without_mode_is_usage_error():
    result = run_python([NPH_WEBJOB, 'dsvtool'])
    err = result.stderr.decode()
    assert result.returncode == 2 and result.stdout == b''
    assert err.startswith('webjob-dsvtool: ') and 'nph_webjob.py dsvtool' in err


def test_server_usage_names_dsvtool():
    result = run_python([NPH_WEBJOB, '--help'])
    assert result.returncode == 0 and b'nph_webjob.py dsvtool' in result.stdout
