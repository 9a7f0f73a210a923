"""The `spattn` dispatcher: bad flags give one line naming the fix and exit code 2, never a usage block."""
import pytest

from spattn.cli.main import main


@pytest.mark.parametrize("argv", [["generate", "--bogus"], ["plan", "--gpus", "x"], ["nope"]])
def test_bad_flags_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--help" in err[0], err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().out
