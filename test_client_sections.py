"""Deferred sections: the parts of webjob.py a run may not need are kept as
their own source text and compiled the first time one of their names is
called (issue 14, start-up).  These tests pin that the texts are the file's
own, compile everywhere, show their true lines, are loaded by the runs that
need them and by no other, and leave a test's replacement in place.
"""

import ast
import linecache
import os
import subprocess
import sys
import traceback

import pytest

import webjob
from conftest import (PYTHONS, OLDEST_PY, NEWEST_PY, WEBJOB, HERE,
                      write_file)

BAR = '#' * 79

#: What a plain http job compiles besides the plain code (a change that
#: makes it compile more shows here first).
PLAIN_JOB_SECTIONS = ['Modes', 'Stages', 'Transport']


def read_webjob():
    with open(WEBJOB, encoding='utf-8') as handle:
        return handle.read()


def banner_at(source, position):
    """The name of the banner section the position lies in."""
    name = None
    for line in source[:position].split('\n'):
        if line.startswith('# ') and line.endswith('####'):
            name = line[2:].split(' ###')[0]
    return name


#: A child that imports webjob, runs main(argv) and writes the names of
#: the sections it loaded to the file named first.
LOADED_REPORT = (
    'import sys; sys.path.insert(0, %r); import webjob\n'
    'code = webjob.main(sys.argv[2:])\n'
    'with open(sys.argv[1], "w") as report:\n'
    '    report.write("\\n".join(sorted(webjob.LOADED)))\n'
    'sys.exit(code)\n' % HERE)


def sections_loaded_by(tmp_path, argv, python=None, stdin=None):
    """(exit code, sorted names of the sections a run of argv loaded)."""
    report = tmp_path / 'loaded.txt'
    proc = subprocess.Popen(
        [python or sys.executable, '-I', '-S', '-B', '-c', LOADED_REPORT,
         str(report)] + list(argv), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path))
    out, err = proc.communicate(stdin, timeout=120)
    assert report.exists(), err.decode('utf-8', 'replace')
    text = report.read_text()
    return proc.returncode, text.split('\n') if text else []


# The texts ###################################################################

def test_every_section_text_is_the_file_s_own_under_its_banner():
    source = read_webjob()
    assert len(webjob.SECTIONS) >= 10
    for name, (names, text) in webjob.SECTIONS.items():
        at = source.find(text)
        assert at > 0 and source.find(text, at + 1) == -1, name
        assert banner_at(source, at) == name
        assert source[:at].endswith("), r'''") and \
            source[at + len(text):].startswith("''')")


def test_each_names_tuple_is_exactly_the_text_s_defs_and_classes():
    for name, (names, text) in webjob.SECTIONS.items():
        tree = ast.parse(text)
        kinds = set(type(node).__name__ for node in tree.body)
        assert kinds <= {'FunctionDef', 'ClassDef'}, name
        assert tuple(node.name for node in tree.body) == names, name


def test_no_name_is_deferred_twice_or_also_plain():
    plain = ast.parse(read_webjob())
    top = set()
    for node in plain.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top.add(node.name)
        elif isinstance(node, ast.Assign):
            top.update(t.id for t in node.targets if isinstance(t, ast.Name))
    every = [n for names, _ in webjob.SECTIONS.values() for n in names]
    assert len(every) == len(set(every)) == len(webjob.STUBS)
    assert set(every) & top == set()


def non_call_uses(tree, deferred, unit):
    """(name, line) of each deferred name of another unit used other than
    as the function of a call: a stub cannot be subclassed, caught, tested
    with isinstance or have its attributes read."""
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and \
                isinstance(node.value, ast.Name) and \
                node.value.id == 'webjob':
            name = node.attr
        elif isinstance(node, ast.Name):
            name = node.id
        else:
            continue
        if deferred.get(name, unit) != unit:
            parent = parents.get(node)
            if not (isinstance(parent, ast.Call) and parent.func is node):
                found.append((name, node.lineno))
    return found


def test_deferred_names_are_only_called_from_outside_their_section():
    deferred = dict((name, section)
                    for section, (names, _) in webjob.SECTIONS.items()
                    for name in names)
    found = non_call_uses(ast.parse(read_webjob()), deferred, None)
    for section, (names, text) in webjob.SECTIONS.items():
        found += non_call_uses(ast.parse(text), deferred, section)
    with open(os.path.join(HERE, 'nph_webjob.py'), encoding='utf-8') as f:
        found += non_call_uses(ast.parse(f.read()), deferred, None)
    assert found == []


@pytest.mark.parametrize('python', PYTHONS)
def test_every_section_compiles_and_loads(python):
    script = ('import sys; sys.path.insert(0, %r); import webjob\n'
              'for name in webjob.SECTIONS: webjob.load_section(name)\n'
              'stubs = [n for n, s in webjob.STUBS.items()'
              ' if getattr(webjob, n) is s]\n'
              'print(len(webjob.LOADED), len(webjob.SECTIONS), stubs)' % HERE)
    out = subprocess.check_output([python, '-I', '-S', '-B', '-c', script],
                                  timeout=120)
    loaded, total, stubs = out.decode().split(' ', 2)
    assert loaded == total and stubs.strip() == '[]'


# Line numbers ################################################################

def test_each_deferred_definition_has_its_line_in_the_file():
    source = read_webjob().split('\n')
    for section in webjob.SECTIONS:
        for name, obj in webjob.load_section(section).items():
            if isinstance(obj, type):
                code = next(value.__code__ for value in vars(obj).values()
                            if hasattr(value, '__code__'))
                expect = '    def %s(' % code.co_name
            else:
                code = obj.__code__
                expect = 'def %s(' % name
            assert code.co_filename == webjob.__file__
            line = source[code.co_firstlineno - 1]
            if line.lstrip().startswith('@'):
                line = source[code.co_firstlineno]
            assert line.startswith(expect), (section, name, line)


def test_a_traceback_from_a_deferred_function_shows_its_true_line():
    with pytest.raises(webjob.DERError) as caught:
        webjob.der_read_tlv(b'\x30', 0, 1)
    frame = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert frame.filename == webjob.__file__ and frame.name == 'der_read_tlv'
    line = read_webjob().split('\n')[frame.lineno - 1]
    assert line.strip() == frame.line == \
        linecache.getline(webjob.__file__, frame.lineno).strip()
    assert line.strip().startswith('raise DERError(')


# Which runs load what ########################################################

def test_importing_loads_no_section(tmp_path):
    report = tmp_path / 'loaded.txt'
    script = ('import sys; sys.path.insert(0, %r); import webjob\n'
              'open(%r, "w").write(repr(sorted(webjob.LOADED)))'
              % (HERE, str(report)))
    subprocess.check_call([sys.executable, '-I', '-S', '-B', '-c', script],
                          timeout=60)
    assert report.read_text() == '[]'


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY])
def test_version_mode_compiles_no_deferred_section(tmp_path, python):
    assert sections_loaded_by(tmp_path, ['-v'], python) == (0, [])


def test_hash_mode_loads_only_the_section_it_needs(tmp_path):
    write_file(tmp_path / 'f', b'abc')
    assert sections_loaded_by(tmp_path, ['-h', '-t', 'sha256', 'f']) == (
        0, ['Modes: stops, link tests and the other modes'])


def stored_jobs(server):
    """How many jobs the server has stored whole (their .rdy markers)."""
    return len([name for name in server.incoming() if name.endswith('.rdy')])


def job_config(tmp_path, url, **extra):
    lines = ['ClientId=client_1', 'URLGetURL=' + url, 'URLPutURL=' + url,
             'TempDirectory=%s' % tmp_path, 'OverwriteExecutable=Y',
             'UnlinkExecutable=Y', 'UnlinkOutput=Y']
    lines += ['%s=%s' % item for item in sorted(extra.items())]
    return ('\n'.join(lines) + '\n').encode('ascii')


@pytest.mark.parametrize('python', [OLDEST_PY, NEWEST_PY])
def test_a_plain_http_job_loads_only_transport_stages_and_modes(
        standalone_server, tmp_path, python):
    server = standalone_server()
    code, loaded = sections_loaded_by(
        tmp_path, ['-e', '-f', '-', 'hostname.sh'], python,
        job_config(tmp_path, server.cgi_url))
    assert code == 0 and stored_jobs(server) == 1
    assert loaded == PLAIN_JOB_SECTIONS


def test_an_https_job_loads_tls_too(standalone_server, pki, tmp_path):
    server = standalone_server(args=['--tls-cert', pki.path(
        'server-chain.pem'), '--tls-key', pki.path('server.key')])
    url = 'https://127.0.0.1:%d/cgi-client/nph-webjob.cgi' % server.port
    code, loaded = sections_loaded_by(
        tmp_path, ['-e', '-f', '-', 'hostname.sh'], None, job_config(
            tmp_path, url, SSLVerifyPeerCert='Y',
            SSLExpectedPeerCN='webjob.test',
            SSLBundledCAsFile=pki.path('ca.crt')))
    assert code == 0 and stored_jobs(server) == 1
    assert set(PLAIN_JOB_SECTIONS + ['TLS']) <= set(loaded)
    assert 'Uploads: resumable and streamed' not in loaded
    assert 'Job queue mode' not in loaded


def test_running_a_section_writes_no_file(tmp_path):
    """No __pycache__ or anything else beside a copy run from its folder."""
    folder = tmp_path / 'media'
    folder.mkdir()
    write_file(folder / 'webjob.py', read_webjob().encode('utf-8'))
    write_file(folder / 'f', b'abc')
    before = sorted(os.listdir(str(folder)))
    for argv in (['-v'], ['-h', '-t', 'md5', 'f']):
        subprocess.check_call([sys.executable, '-I', '-S', 'webjob.py'] + argv,
                              cwd=str(folder), stdout=subprocess.DEVNULL,
                              timeout=60)
    assert sorted(os.listdir(str(folder))) == before


# Replacements survive ########################################################

def test_a_replaced_name_survives_the_load_of_its_section(tmp_path):
    """A monkeypatched name keeps its replacement when its section loads;
    put back, its stub reaches the real function."""
    script = '\n'.join([
        'import sys; sys.path.insert(0, %r); import webjob' % HERE,
        'stub = webjob.build_query',
        'webjob.build_query = lambda pairs: "replaced"',
        'assert "Transport" not in webjob.LOADED',
        'assert webjob.http_escape("a b") == "a+b"',   # loads Transport
        'assert "Transport" in webjob.LOADED',
        'assert webjob.build_query([]) == "replaced"',
        'assert webjob.http_escape is not webjob.STUBS["http_escape"]',
        'webjob.build_query = stub',
        'assert webjob.build_query([("A", "b c")]) == "A=b+c"',
        'print("ok")'])
    out = subprocess.check_output([sys.executable, '-I', '-S', '-B', '-c',
                                   script], timeout=60)
    assert out == b'ok\n'
