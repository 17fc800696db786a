"""webjob.py's command line: --help, alone and after each mode."""

import pytest

import webjob


def mode_flags():
    """The first flag of each USAGE line ('-e', '-g', ...), but --help."""
    flags = []
    for line in webjob.USAGE.splitlines():
        word = line[7:].split()[1]
        if word != '--help':
            flags.append(word.strip('{}').split('|')[0])
    return flags


def test_help_prints_the_synopsis_on_stdout(capsys):
    assert webjob.main(['--help']) == 0
    out, err = capsys.readouterr()
    assert out == webjob.USAGE and err == ''


@pytest.mark.parametrize('flag', [f for f in mode_flags() if f != '--dsvtool'])
def test_help_after_a_mode_prints_that_modes_line(capsys, flag):
    assert webjob.main([flag, '--help']) == 0
    out, err = capsys.readouterr()
    assert err == '' and out.count('\n') == 1
    assert out.startswith('Usage: webjob ') and flag in out


def test_dash_h_is_still_hashsum_not_help(capsys):
    assert webjob.main(['-h']) == 2
    out, err = capsys.readouterr()
    assert out == '' and 'missing -t|--type' in err


def test_help_after_the_program_goes_to_the_program(tmp_path, capsys):
    """Everything after the program is the program's: the config is read
    (and here fails), --help is not taken as ours."""
    assert webjob.main(['-e', '-f', str(tmp_path / 'none.cfg'), 'ps',
                        '--help']) == 5
    assert capsys.readouterr().out == ''


def test_a_usage_error_prints_the_synopsis_on_stderr_and_exits_2(capsys):
    assert webjob.main(['-x']) == 2
    out, err = capsys.readouterr()
    assert out == '' and err.endswith(webjob.USAGE)
