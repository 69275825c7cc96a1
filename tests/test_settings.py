"""Settings: precedence, aliases, and the messages for bad values."""

import pytest

from fl_patch import settings
from fl_patch.errors import SettingsError


def test_defaults():
    s = settings.load(env={})
    assert (s.enabled, s.auto, s.kernels, s.dist, s.gems_global, s.strict) == (True, True, "gems", "auto", False, False)
    assert s.include == () and s.exclude == () and s.gems_unused is None and not s.kernels_explicit


def test_environment_is_read_and_lists_are_split():
    env = {"FL_PATCH_EXCLUDE": " attention, rope ,", "FL_PATCH_KERNELS": "Reference", "FL_PATCH_DIST": "native",
           "FL_PATCH_GEMS_UNUSED": "softmax", "FL_PATCH_STRICT": "yes", "FL_PATCH_LOG_LEVEL": "debug"}
    s = settings.load(env=env)
    assert s.exclude == ("attention", "rope") and s.kernels == "reference" and s.kernels_explicit
    assert s.dist == "native" and s.gems_unused == ("softmax",) and s.strict and s.log_level == "DEBUG"


def test_explicit_arguments_beat_the_environment():
    env = {"FL_PATCH_EXCLUDE": "attention", "FL_PATCH_KERNELS": "gems"}
    s = settings.load(env=env, exclude=["rope"], kernels="reference")
    assert s.exclude == ("rope",) and s.kernels == "reference"
    assert settings.load(env=env, exclude="linear,rope").exclude == ("linear", "rope")


def test_seed_plugin_aliases_and_their_precedence():
    env = {"LIGHTX2V_FL_GLOBAL_GEMS": "1", "LIGHTX2V_FL_GEMS_UNUSED": "softmax,exponential_",
           "LIGHTX2V_FL_DISABLE_FLAGCX": "1", "LIGHTX2V_FL_AUTO_REGISTER": "0"}
    s = settings.load(env=env)
    assert s.gems_global and s.gems_unused == ("softmax", "exponential_") and s.dist == "native" and not s.auto
    assert settings.load(env={**env, "FL_PATCH_DIST": "flagcx"}).dist == "flagcx"
    assert settings.load(env={"LIGHTX2V_FL_DISABLE_FLAGCX": "0"}).dist == "auto"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FL_PATCH": "maybe"}, "FL_PATCH='maybe' is not a boolean; accepted: 1, 0, true, false, yes, no, on, off"),
        ({"FL_PATCH_KERNELS": "triton"}, "FL_PATCH_KERNELS='triton' is not accepted; accepted: gems, reference"),
        ({"FL_PATCH_DIST": "nccl"}, "FL_PATCH_DIST='nccl' is not accepted; accepted: auto, flagcx, native"),
        ({"FL_PATCH_LOG_LEVEL": "loud"}, "FL_PATCH_LOG_LEVEL='LOUD' is not accepted; accepted: DEBUG, INFO"),
        ({"LIGHTX2V_FL_DISABLE_FLAGCX": "perhaps"}, "LIGHTX2V_FL_DISABLE_FLAGCX='perhaps' is not a boolean"),
    ],
)
def test_bad_values_name_the_variable_the_value_and_what_is_accepted(env, message):
    with pytest.raises(SettingsError) as error:
        settings.load(env=env)
    assert message in str(error.value)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(SettingsError, match="unknown setting"):
        settings.load(env={}, exclusions=["rope"])
    with pytest.raises(SettingsError, match="kernels='cuda' is not accepted"):
        settings.load(env={}, kernels="cuda")
    with pytest.raises(SettingsError, match="exclude: 3 is not a name"):
        settings.load(env={}, exclude=[3])
    with pytest.raises(SettingsError, match="strict='yes please' is not a boolean"):
        settings.load(env={}, strict="yes please")


def test_settings_are_frozen():
    s = settings.load(env={})
    with pytest.raises(AttributeError):
        s.kernels = "reference"
