"""``expiry``, ``from``, ``cert_authorities`` and ``principals`` in ``[[relay.user]]``/
``[[relay.agent]]`` tables (relay/config/lifecycle.py): what they become, the errors
(file, key, what is valid), and that a reload treats them as grants."""

from __future__ import annotations

import calendar
import datetime
import subprocess
from pathlib import Path

import pytest

from relay.config import diff
from relay.config.errors import ConfigError
from relay.config.loader import parse_config
from relay.config.schema import RelayConfig

SOURCE = "/etc/labrelay/relay.toml"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    directory = tmp_path_factory.mktemp("keys")
    lines = []
    for i in range(2):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"key{i}",
                        "-f", str(directory / f"k{i}")], check=True)
        lines.append(" ".join((directory / f"k{i}.pub").read_text().split()[:2]))
    return lines


def relay_of(text: str) -> RelayConfig:
    relay = parse_config(text, SOURCE, base_dir=Path("/etc/labrelay")).relay
    assert relay is not None
    return relay


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE)
    return info.value


def test_expiry_and_from_limit_every_key_of_the_entry(keys: list[str]) -> None:
    relay = relay_of('[relay]\n[[relay.user]]\nname = "alice"\n'
                     f'keys = ["{keys[0]}", "{keys[1]}"]\n'
                     'expiry = "20270131Z"\nfrom = "10.0.0.0/8,!10.0.0.66"\n')
    (alice,) = relay.users
    when = float(calendar.timegm((2027, 1, 31, 0, 0, 0)))
    assert [(kl.key, kl.expires, kl.sources) for kl in alice.key_limits] == [
        (keys[0], when, "10.0.0.0/8,!10.0.0.66"), (keys[1], when, "10.0.0.0/8,!10.0.0.66")]
    assert alice.authorities == ()


@pytest.mark.parametrize("written, expected", [
    ("2027-01-31T12:00:00Z", datetime.datetime(2027, 1, 31, 12, tzinfo=datetime.UTC).timestamp()),
    ("2027-01-31T12:00:00", datetime.datetime(2027, 1, 31, 12).timestamp()),  # local
    ("2027-01-31", datetime.datetime(2027, 1, 31).timestamp()),
    ('"202701311200Z"', datetime.datetime(2027, 1, 31, 12, tzinfo=datetime.UTC).timestamp()),
])
def test_expiry_takes_openssh_text_or_a_toml_date_time(keys: list[str], written: str,
                                                        expected: float) -> None:
    relay = relay_of(f'[relay]\n[[relay.user]]\nname = "alice"\nkeys = ["{keys[0]}"]\n'
                     f"expiry = {written}\n")
    assert relay.users[0].key_limits[0].expires == expected


def test_certificate_authorities_need_no_keys_and_default_to_the_name(keys: list[str]) -> None:
    relay = relay_of('[relay]\n[[relay.user]]\nname = "alice"\n'
                     f'cert_authorities = ["{keys[0]} ca"]\n'
                     f'[[relay.user]]\nname = "bob"\ncert_authorities = ["{keys[0]}"]\n'
                     'principals = ["bob", "bob@lab"]\nexpiry = "20270101Z"\n'
                     f'[[relay.agent]]\nname = "lab_pc"\ncert_authorities = ["{keys[1]}"]\n'
                     'services = ["gpu-cluster:22"]\n')
    alice, bob = relay.users
    assert alice.keys == () and alice.authorities[0].principals == ("alice",)
    assert alice.authorities[0].key == f"{keys[0]} ca"
    assert alice.authorities[0].where == f"{SOURCE}: relay.user[0].cert_authorities[0]"
    assert bob.authorities[0].principals == ("bob", "bob@lab")
    assert bob.authorities[0].expires == float(calendar.timegm((2027, 1, 1, 0, 0, 0)))
    (lab_pc,) = relay.agents
    assert lab_pc.authorities[0].principals == ("lab_pc",)


@pytest.mark.parametrize("body, keypath, fragment", [
    ('expiry = "2027-01"', "relay.user[0].expiry", "YYYYMMDD[HHMM[SS]][Z]"),
    ('expiry = "20271301"', "relay.user[0].expiry", "not a valid date and time"),
    ("expiry = 20270101", "relay.user[0].expiry", "expected a string or a TOML date-time"),
    ('from = "10.0.0.0/33"', "relay.user[0].from", "not a valid CIDR block"),
    ('from = "10.0.0.0/8,,"', "relay.user[0].from", "empty pattern"),
    ('principals = ["alice"]', "relay.user[0].principals", "only for certificates"),
    ('cert_authorities = ["ssh-ed25519 nope"]', "relay.user[0].cert_authorities[0]", ""),
])
def test_errors_name_the_file_the_key_and_what_is_valid(keys: list[str], body: str,
                                                         keypath: str, fragment: str) -> None:
    err = error_of(f'[relay]\n[[relay.user]]\nname = "alice"\nkeys = ["{keys[0]}"]\n{body}\n')
    assert (err.source, err.keypath) == (SOURCE, keypath)
    assert fragment in str(err) and err.hint


def test_bad_principal_and_no_keys_at_all(keys: list[str]) -> None:
    err = error_of(f'[relay]\n[[relay.user]]\nname = "alice"\ncert_authorities = ["{keys[0]}"]\n'
                   'principals = ["al ice"]\n')
    assert err.keypath == "relay.user[0].principals[0]" and "not valid" in str(err)
    err = error_of('[relay]\n[[relay.user]]\nname = "alice"\nservices = ["gpu:22"]\n')
    assert err.keypath == "relay.user[0].keys" and "cert_authorities" in (err.hint or "")


def test_a_reload_applies_them_as_grants(keys: list[str]) -> None:
    before = relay_of(f'[relay]\n[[relay.user]]\nname = "alice"\nkeys = ["{keys[0]}"]\n')
    after = relay_of(f'[relay]\n[[relay.user]]\nname = "alice"\nkeys = ["{keys[0]}"]\n'
                     'expiry = "20200101Z"\n')
    (action,) = diff.diff_relay(before, after)
    assert isinstance(action, diff.RelaySettings) and action.grants
    assert action.fields == ("users",)


def test_trusted_user_ca_lets_users_have_no_keys(keys: list[str]) -> None:
    """``trusted_user_ca`` in ``[relay]`` (a string or an array): a ``[[relay.user]]``
    needs no keys then (agents still do), its ``expiry``/``from`` are kept for the CA's
    certificates, and a change re-reads the grants on reload."""
    text = (f'[relay]\ntrusted_user_ca = ["{keys[0]}", "{keys[0]}"]\n'
            '[[relay.user]]\nname = "alice"\nservices = ["gpu:22"]\nfrom = "10.0.0.0/8"\n'
            'expiry = "20270131Z"\n')
    relay = relay_of(text)
    assert relay.trusted_user_ca == (keys[0],)  # listed twice: once
    (alice,) = relay.users
    assert alice.keys == () and alice.sources == "10.0.0.0/8"
    assert alice.expires == calendar.timegm((2027, 1, 31, 0, 0, 0))
    assert relay_of(f'[relay]\ntrusted_user_ca = "{keys[1]}"\n').trusted_user_ca == (keys[1],)
    err = error_of(f'[relay]\ntrusted_user_ca = "{keys[0]}"\n[[relay.agent]]\n'
                   'name = "lab_pc"\nservices = ["gpu:22"]\n')
    assert err.keypath == "relay.agent[0].keys"
    (action,) = diff.diff_relay(relay, relay_of(text.replace(keys[0], keys[1])))
    assert isinstance(action, diff.RelaySettings) and action.grants
    assert action.fields == ("trusted_user_ca",)


@pytest.mark.parametrize(("value", "fragment"), [
    ('"ssh-ed25519 AAAA"', "not a valid ssh-ed25519 public key"),
    ("5", "expected a string or an array of strings"),
    ('["ssh-ed25519-cert-v01@openssh.com AAAA lab"]', "certificates"),
])
def test_trusted_user_ca_errors_name_the_file_the_key_and_what_is_valid(
        value: str, fragment: str) -> None:
    err = error_of(f"[relay]\ntrusted_user_ca = {value}\n")
    assert err.source == SOURCE and err.keypath.startswith("relay.trusted_user_ca")
    assert fragment in str(err) and err.hint
