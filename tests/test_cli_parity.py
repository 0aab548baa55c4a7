"""nnUNetv2_predict_gfscreen accepts every option string of the installed nnUNetv2_predict, with its defaults.

nnU-Net builds its parser inside `predict_entry_point`; the test captures it by intercepting `parse_args`,
so a new nnU-Net release that adds an option or an alias fails here instead of drifting silently.
"""
import argparse

import pytest

from nnunetv2_gfscreen.predictors.cli_args import build_parser

# options whose default differs on purpose
OWN_DEFAULTS = {"tr"}  # GFScreenTrainer instead of nnUNetTrainer


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _nnunet_parser(monkeypatch, entry_point) -> argparse.ArgumentParser:
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured) as caught:
        entry_point()
    monkeypatch.undo()
    return caught.value.parser


def _options(parser: argparse.ArgumentParser) -> dict:
    """option string -> action (help excluded)."""
    return {o: a for a in parser._actions for o in a.option_strings if a.dest != "help"}


def test_every_nnunet_predict_option_and_alias_is_accepted(monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    theirs, ours = _options(_nnunet_parser(monkeypatch, predict_entry_point)), _options(build_parser())
    assert len(theirs) >= 18  # the capture found nnU-Net's real parser
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"nnUNetv2_predict options that nnUNetv2_predict_gfscreen lacks: {missing}"
    for option, action in theirs.items():
        mine = ours[option]
        assert set(mine.option_strings) >= set(action.option_strings), option  # every alias of that option
        assert mine.dest == action.dest and mine.nargs == action.nargs and mine.type == action.type, option
        assert mine.required == action.required, option
        if action.dest not in OWN_DEFAULTS:
            assert mine.default == action.default, option


def test_model_folder_alias_of_continue_prediction_is_accepted(monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder

    theirs = _options(_nnunet_parser(monkeypatch, predict_entry_point_modelfolder))
    aliases = set(theirs["--continue_prediction"].option_strings)
    assert aliases <= set(_options(build_parser()))


@pytest.mark.parametrize("npp, nps", [("1", "0"), ("5", "2")])
def test_npp_nps_come_from_the_environment_as_in_nnunet(monkeypatch, npp, nps):
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    monkeypatch.setenv("nnUNet_npp", npp)
    monkeypatch.setenv("nnUNet_nps", nps)
    theirs = _nnunet_parser(monkeypatch, predict_entry_point)
    monkeypatch.setenv("nnUNet_npp", npp)  # _nnunet_parser undid the environment too
    monkeypatch.setenv("nnUNet_nps", nps)
    ours = build_parser()
    required = ["-i", "in", "-o", "out", "-d", "1", "-c", "3d_fullres"]
    a, b = theirs.parse_args(required), ours.parse_args(required)
    assert (a.npp, a.nps) == (b.npp, b.nps) == (int(npp), int(nps))
    assert ours.parse_args(required + ["-npp", "7"]).npp == 7  # the command line still wins
    monkeypatch.setenv("nnUNet_npp", "not-a-number")
    assert build_parser().parse_args(required).npp == 3  # nnU-Net falls back to its default too
