"""The core webjob.py shares with nph_webjob.py: what __all__ promises, the
server keeping to it, and the shared pieces that once drifted apart (URL
redaction against the URL parser, whole-file writes, override files).
"""

import ast
import builtins
import os
import stat
import symtable

import pytest

import webjob

HERE = os.path.dirname(os.path.abspath(__file__))


def names_the_server_takes_from_webjob():
    """Every webjob.X that nph_webjob.py's code reads."""
    with open(os.path.join(HERE, 'nph_webjob.py'), 'rb') as handle:
        tree = ast.parse(handle.read())
    return set(node.attr for node in ast.walk(tree)
               if isinstance(node, ast.Attribute)
               and isinstance(node.value, ast.Name)
               and node.value.id == 'webjob')


# __all__ #####################################################################

def test_every_exported_name_exists():
    assert [name for name in webjob.__all__ if not hasattr(webjob, name)] == []
    assert len(set(webjob.__all__)) == len(webjob.__all__)


def test_server_uses_only_the_exported_core():
    outside = names_the_server_takes_from_webjob() - set(webjob.__all__)
    assert outside == set(), 'add to webjob.__all__ or keep in the server'


def test_server_keeps_no_copy_of_a_core_function():
    import nph_webjob
    copies = [name for name in ('is_digits', 'fsync_folder', 'replace_file',
                                'spawn', 'wait_with_deadline', 'one_line',
                                'parse_url', 'read_override_file',
                                'hash_stream_all', 'kill_group')
              if name in vars(nph_webjob)]
    assert copies == []


def source_units(path):
    """The module's text, and for webjob.py each deferred section's text
    (compiled into the same globals when first used)."""
    with open(path) as handle:
        units = [handle.read()]
    if os.path.basename(path) == 'webjob.py':
        units += [text for names, text in webjob.SECTIONS.values()]
    return units


def undefined_globals(path):
    """(name, function) for every global a function reads that the module
    never defines: a call left behind when a copy was deleted."""
    tops = [symtable.symtable(text, path, 'exec')
            for text in source_units(path)]
    defined = set(symbol.get_name() for top in tops
                  for symbol in top.get_symbols()
                  if symbol.is_assigned() or symbol.is_imported()
                  or symbol.is_namespace())
    found, tables = set(), list(tops)
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for symbol in table.get_symbols():
            name = symbol.get_name()
            if symbol.is_referenced() and (symbol.is_global() or table in tops) \
                    and name not in defined and not hasattr(builtins, name) \
                    and name not in ('__file__', '__name__'):
                found.add((name, table.get_name()))
    return sorted(found)


@pytest.mark.parametrize('name', ['webjob.py', 'nph_webjob.py'])
def test_every_global_a_function_reads_is_defined(name):
    assert undefined_globals(os.path.join(HERE, name)) == []


# URL redaction follows the URL parser ########################################

@pytest.mark.parametrize('url,shown', [
    ('http://u:p@host/x', 'http://u:********@host/x'),
    ('http://u:p@host/a@b', 'http://u:********@host/a@b'),
    ('https://u:p@h:8443/p?q=a:b@c', 'https://u:********@h:8443/p?q=a:b@c'),
    ('http://u:pa/ss@host/', 'http://********@host/'),     # refused URL
    ('http://host/a:b@c', 'http://host/a:b@c'),           # no userinfo
    ('http://u@host/', 'http://u@host/'),                 # no password
    ('not a url', 'not a url')])
def test_redact_url_hides_what_parse_url_takes_as_a_password(url, shown):
    assert webjob.redact_url(url) == shown


def test_redact_url_never_shows_the_password_parse_url_reads():
    for url in ('http://u:s3cret@h/a@b', 'http://u:s3cret@h:1/@',
                'https://u:s3cret@[::1]/p'):
        parts = webjob.parse_url(url)
        assert parts is not None and parts[2] is not None
        assert parts[2] not in webjob.redact_url(url)


# replace_file: whole or not at all ###########################################

def test_replace_file_writes_whole_file_with_its_mode(tmp_path):
    path = str(tmp_path / 'f')
    webjob.replace_file(path, b'old')
    webjob.replace_file(path, b'new data', 0o600)
    with open(path, 'rb') as handle:
        assert handle.read() == b'new data'
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(str(tmp_path)) == ['f']


def test_replace_file_leaves_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / 'f')
    webjob.replace_file(path, b'old')
    with pytest.raises(TypeError):
        webjob.replace_file(path, 'not bytes')
    with open(path, 'rb') as handle:
        assert handle.read() == b'old'
    assert os.listdir(str(tmp_path)) == ['f']


def test_replace_file_never_writes_through_a_planted_temporary_link(
        tmp_path):
    """A link planted where a temporary name could be (a crashed run's, or
    an attacker's) is never written through."""
    target = tmp_path / 'elsewhere'
    target.write_bytes(b'keep')
    for name in ('.f.%d.tmp' % os.getpid(), 'f.%d.tmp' % os.getpid()):
        os.symlink(str(target), str(tmp_path / name))
    webjob.replace_file(str(tmp_path / 'f'), b'new')
    assert target.read_bytes() == b'keep'
    assert (tmp_path / 'f').read_bytes() == b'new'
    assert not (tmp_path / 'f').is_symlink()


# read_override_file ##########################################################

CONTROLS = (('RunTimeLimit', 'uint', 0), ('RunType', 'runtype', 'snapshot'))


def test_read_override_file_returns_only_what_the_file_sets(tmp_path):
    path = tmp_path / 'override.cfg'
    path.write_text('# a comment\nRunTimeLimit=30\n')
    assert webjob.read_override_file(str(path), CONTROLS) == (
        {'RunTimeLimit': 30}, {'RunTimeLimit': '%s:2' % path})


def test_read_override_file_names_file_line_and_control(tmp_path):
    path = tmp_path / 'override.cfg'
    path.write_text('RunType=sometimes\n')
    with pytest.raises(webjob.PropertiesError) as caught:
        webjob.read_override_file(str(path), CONTROLS)
    assert '%s:1: RunType' % path in str(caught.value)
