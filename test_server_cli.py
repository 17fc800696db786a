"""nph_webjob.py's command line: --help on every subcommand, usage errors,
install-cgi's refusals and serve's refusal of a folder that is no locker."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import nph_webjob
from conftest import NPH_WEBJOB, OLDEST_PY, WEBJOB, write_file


def usage_commands():
    """The subcommands USAGE lists (every one of them must have --help)."""
    words = [line[7:].split()[1] for line in nph_webjob.USAGE.splitlines()
             if line[7:8] not in ('', ' ') and len(line[7:].split()) > 1]
    return [word for word in words if not word.startswith(('-', '(', '{'))]


def run_server(args, cwd=None, python=sys.executable, server=NPH_WEBJOB):
    return subprocess.run([python, server] + list(args), cwd=cwd,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120)


def test_usage_lists_the_four_subcommands():
    assert set(usage_commands()) >= {'serve', 'verify', 'list', 'install-cgi'}


@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_help_alone_prints_the_whole_usage(capsys, flag):
    assert nph_webjob.main([flag]) == 0
    out, err = capsys.readouterr()
    assert out == nph_webjob.USAGE and err == ''


@pytest.mark.parametrize('command', usage_commands())
@pytest.mark.parametrize('flag', ['-h', '--help'])
def test_every_subcommand_has_help_of_its_own(capsys, command, flag):
    assert nph_webjob.main([command, flag]) == 0
    out, err = capsys.readouterr()
    assert err == ''
    assert out.startswith('Usage: nph_webjob.py %s ' % command) or \
        (command == 'dsvtool' and out == nph_webjob.DSVTOOL_USAGE)
    assert out != nph_webjob.USAGE


def test_help_after_other_options_still_prints_the_usage(capsys):
    assert nph_webjob.main(['serve', '--port', '1', '--help']) == 0
    assert capsys.readouterr().out == nph_webjob.command_usage('serve')


@pytest.mark.parametrize('argv', [['serve', '--nope'], ['list', '--since'],
                                  ['verify', 'extra'], ['install-cgi']])
def test_a_usage_error_prints_that_subcommands_usage_and_exits_2(capsys,
                                                                 argv):
    assert nph_webjob.main(argv) == 2
    out, err = capsys.readouterr()
    first, rest = err.split('\n', 1)
    assert out == '' and first.startswith('nph_webjob: ')
    assert rest == nph_webjob.command_usage(argv[0])


def test_an_unknown_subcommand_with_help_is_a_usage_error(capsys):
    assert nph_webjob.main(['bogus', '--help']) == 2
    assert nph_webjob.USAGE in capsys.readouterr().err


def test_install_cgi_help_writes_no_stub(tmp_path):
    result = run_server(['install-cgi', '--help'], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith('Usage: nph_webjob.py install-cgi')
    assert os.listdir(str(tmp_path)) == []


def test_install_cgi_refuses_a_path_that_looks_like_an_option(tmp_path):
    result = run_server(['install-cgi', '--config'], cwd=str(tmp_path))
    assert result.returncode == 2
    assert os.listdir(str(tmp_path)) == []


def test_install_cgi_refuses_an_interpreter_the_web_server_cannot_reach(
        tmp_path):
    """pyenv's Python lives under /root (mode 0700): www-data could never
    run a stub whose first line names it."""
    assert OLDEST_PY.startswith('/root/') and \
        not os.stat('/root').st_mode & 0o001, 'the test needs pyenv in /root'
    stub = tmp_path / 'nph-webjob.cgi'
    result = run_server(['install-cgi', str(stub)], python=OLDEST_PY)
    err = result.stderr.decode()
    assert result.returncode == 1
    assert err.count('\n') == 1 and 'the interpreter' in err and \
        'cannot enter /root,' in err and '--force' in err, err
    assert not stub.exists()


@pytest.fixture
def open_folder():
    """A folder everyone may enter (tmp_path's parents are root's only)."""
    folder = tempfile.mkdtemp(prefix='webjob-cli-')
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_install_cgi_refuses_modules_in_a_folder_others_cannot_enter(
        open_folder):
    lib = os.path.join(open_folder, 'private')
    os.mkdir(lib, 0o700)
    for source in (NPH_WEBJOB, WEBJOB):
        shutil.copy(source, lib)
    stub = os.path.join(open_folder, 'x.cgi')
    result = run_server(['install-cgi', stub], python='/usr/bin/python3',
                        server=os.path.join(lib, 'nph_webjob.py'))
    err = result.stderr.decode()
    assert result.returncode == 1
    assert err.count('\n') == 1 and 'cannot enter %s,' % lib in err, err
    assert not os.path.exists(stub)


def test_install_cgi_writes_a_stub_the_web_server_can_run(open_folder):
    lib = os.path.join(open_folder, 'lib')
    os.mkdir(lib, 0o755)
    for source in (NPH_WEBJOB, WEBJOB):
        shutil.copy(source, lib)
        os.chmod(os.path.join(lib, os.path.basename(source)), 0o644)
    stub = os.path.join(open_folder, 'nph-webjob.cgi')
    result = run_server(['install-cgi', stub], python='/usr/bin/python3',
                        server=os.path.join(lib, 'nph_webjob.py'))
    assert result.returncode == 0, result.stderr
    with open(stub) as handle:
        assert handle.readline() == '#!/usr/bin/python3 -IS\n'


def test_serve_refuses_a_root_that_is_no_locker(tmp_path):
    missing = tmp_path / 'webjbo-server'
    result = run_server(['serve', '--root', str(missing), '--port', '0'])
    err = result.stderr.decode()
    assert result.returncode == 1
    assert err.count('\n') == 1 and 'not a locker' in err and \
        '--init' in err, err
    assert not missing.exists()


def test_serve_refuses_an_existing_folder_without_the_layout(tmp_path):
    (tmp_path / 'etc').mkdir()
    result = run_server(['serve', '--root', str(tmp_path / 'etc'),
                         '--port', '0'])
    assert result.returncode == 1 and b'not a locker' in result.stderr
    assert os.listdir(str(tmp_path / 'etc')) == []


def test_serve_refuses_a_config_base_directory_that_is_no_locker(tmp_path):
    cfg = write_file(tmp_path / 'serve.cfg', (
        'BaseDirectory = %s\n' % (tmp_path / 'typo')).encode())
    result = run_server(['serve', '--config', str(cfg), '--port', '0'])
    assert result.returncode == 1 and b'not a locker' in result.stderr
    assert not (tmp_path / 'typo').exists()


def test_serve_init_creates_the_locker(standalone_server, tmp_path):
    server = standalone_server(root=tmp_path / 'new', args=['--init'])
    assert sorted(os.listdir(str(server.root))) == ['incoming', 'logfiles',
                                                    'profiles']
