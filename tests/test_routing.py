# -*- test-case-name: tests.test_routing -*-
"""Where an address goes (SPEC section 4): mailx.inbound.routing."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailx.address import Address, AddressError, normalize_domain, parse_address, split_subaddress
from mailx.config import load_config_text
from mailx.inbound.routing import (
    ForwardDestination,
    MailboxDestination,
    Route,
    Router,
    RouteRefused,
    route,
)
from mailx.smtp import replies
from mailx.smtp.replies import SMTPReplyError
from mailx.testing import SRS_SECRET

CONFIG = """\
hostname: mx.example.test
paths:
  mail: /srv/mail
domains:
  example.test:
    mailboxes: [alice, bob, carol, alice+special]
    aliases:
      postmaster: alice
      team: [alice, bob]
      leads: team
      all: [team, carol, alice]
      sales: dave@example.net
      news: alice+news
      relay: bob@example.org
  example.net:
    mailboxes: [dave]
    aliases:
      postmaster: postmaster@example.test
      "*": dave
  example.org:
    alias_of: example.test
  plain.test:
    mailboxes: [erin, postmaster]
    subaddress_delimiter: null
  bücher.example:
    mailboxes: [info]
    aliases: {postmaster: info}
    subaddress_delimiter: "+-"
"""

BUECHER = "xn--bcher-kva.example"


def mailbox(domain: str, name: str) -> MailboxDestination:
    return MailboxDestination(domain, name)


class RoutingTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.config = load_config_text(CONFIG, "/etc/mailx/mailx.yaml")

    def destinations(self, address: str) -> tuple:
        return route(self.config, address).destinations

    def refusal(self, address: str) -> RouteRefused:
        return self.assertRaises(RouteRefused, route, self.config, address)


class MailboxTests(RoutingTestCase):
    def test_mailbox_routes_to_itself(self) -> None:
        self.assertEqual(
            self.destinations("alice@example.test"), (mailbox("example.test", "alice"),)
        )

    def test_mailbox_trace_names_domain_and_maildir(self) -> None:
        self.assertEqual(
            route(self.config, "alice@example.test").trace,
            (
                "example.test is a local domain",
                "alice@example.test is a mailbox → /srv/mail/example.test/alice",
            ),
        )

    def test_maildir_path_is_under_paths_mail(self) -> None:
        self.assertEqual(
            mailbox("example.test", "alice").maildir_path(self.config),
            Path("/srv/mail/example.test/alice"),
        )

    def test_destination_address_is_mailbox_at_domain(self) -> None:
        self.assertEqual(mailbox("example.test", "alice").address, "alice@example.test")

    def test_route_keeps_the_address_as_given(self) -> None:
        result = route(self.config, "Alice+News@Example.Test")
        self.assertEqual(result.address, Address("alice+news", "example.test"))

    def test_route_accepts_a_parsed_address(self) -> None:
        self.assertEqual(
            route(self.config, Address("bob", "example.test")).destinations,
            (mailbox("example.test", "bob"),),
        )


class AliasTests(RoutingTestCase):
    def test_alias_with_one_target(self) -> None:
        self.assertEqual(
            self.destinations("postmaster@example.test"), (mailbox("example.test", "alice"),)
        )

    def test_alias_with_several_targets_keeps_their_order(self) -> None:
        self.assertEqual(
            self.destinations("team@example.test"),
            (mailbox("example.test", "alice"), mailbox("example.test", "bob")),
        )

    def test_alias_expands_recursively(self) -> None:
        self.assertEqual(
            self.destinations("leads@example.test"),
            (mailbox("example.test", "alice"), mailbox("example.test", "bob")),
        )

    def test_recursive_trace_shows_each_alias(self) -> None:
        trace = route(self.config, "leads@example.test").trace
        self.assertIn("leads@example.test is an alias → team", trace)
        self.assertIn("team@example.test is an alias → alice, bob", trace)

    def test_alias_target_in_another_domain(self) -> None:
        self.assertEqual(self.destinations("sales@example.test"), (mailbox("example.net", "dave"),))

    def test_alias_target_in_an_alias_of_domain(self) -> None:
        self.assertEqual(self.destinations("relay@example.test"), (mailbox("example.test", "bob"),))

    def test_alias_target_with_subaddress_reaches_the_mailbox(self) -> None:
        self.assertEqual(
            self.destinations("news@example.test"), (mailbox("example.test", "alice"),)
        )

    def test_same_mailbox_reached_twice_gets_one_copy(self) -> None:
        self.assertEqual(
            self.destinations("all@example.test"),
            (
                mailbox("example.test", "alice"),
                mailbox("example.test", "bob"),
                mailbox("example.test", "carol"),
            ),
        )

    def test_dedup_is_explained_in_trace(self) -> None:
        self.assertIn(
            "alice@example.test reached more than once → one copy",
            route(self.config, "all@example.test").trace,
        )


class CatchAllTests(RoutingTestCase):
    def test_catch_all_takes_unknown_local_part(self) -> None:
        self.assertEqual(self.destinations("nobody@example.net"), (mailbox("example.net", "dave"),))

    def test_catch_all_is_named_in_trace(self) -> None:
        trace = route(self.config, "nobody@example.net").trace
        self.assertIn(
            "'nobody' is not a mailbox or alias of example.net: the catch-all applies", trace
        )
        self.assertIn("catch-all *@example.net → dave", trace)

    def test_mailbox_wins_over_catch_all(self) -> None:
        self.assertNotIn(
            "catch-all *@example.net → dave", route(self.config, "dave@example.net").trace
        )

    def test_unknown_recipient_without_catch_all(self) -> None:
        self.assertIs(self.refusal("nobody@example.test").reply, replies.UNKNOWN_RECIPIENT)

    def test_unknown_recipient_is_550_5_1_1(self) -> None:
        self.assertEqual(str(self.refusal("nobody@example.test").reply)[:9], "550 5.1.1")

    def test_unknown_recipient_is_an_smtp_reply_error(self) -> None:
        self.assertRaises(SMTPReplyError, route, self.config, "nobody@example.test")

    def test_refusal_carries_its_trace(self) -> None:
        self.assertEqual(
            self.refusal("nobody@example.test").trace,
            (
                "example.test is a local domain",
                "'nobody' is not a mailbox or alias of example.test, and there is no catch-all",
            ),
        )


class SubaddressTests(RoutingTestCase):
    def test_subaddress_is_stripped(self) -> None:
        self.assertEqual(
            self.destinations("alice+news@example.test"), (mailbox("example.test", "alice"),)
        )

    def test_stripping_is_in_trace(self) -> None:
        self.assertIn(
            "'alice+news' → 'alice' (subaddress '+news' stripped)",
            route(self.config, "alice+news@example.test").trace,
        )

    def test_exact_match_wins_over_stripping(self) -> None:
        self.assertEqual(
            self.destinations("alice+special@example.test"),
            (mailbox("example.test", "alice+special"),),
        )

    def test_subaddress_of_an_alias(self) -> None:
        self.assertEqual(
            self.destinations("team+x@example.test"),
            (mailbox("example.test", "alice"), mailbox("example.test", "bob")),
        )

    def test_first_delimiter_splits(self) -> None:
        self.assertEqual(split_subaddress("alice+a+b", "+"), ("alice", "+a+b"))

    def test_delimiter_in_first_position_does_not_split(self) -> None:
        """As Postfix: the base would be empty, so the next delimiter splits."""
        self.assertEqual(split_subaddress("-a+b", "+-"), ("-a", "+b"))

    def test_disabled_delimiter_keeps_local_part_whole(self) -> None:
        self.assertIs(self.refusal("erin+x@plain.test").reply, replies.UNKNOWN_RECIPIENT)

    def test_each_character_is_a_delimiter(self) -> None:
        for address in ("info+x@bücher.example", "info-x@bücher.example"):
            self.assertEqual(self.destinations(address), (mailbox(BUECHER, "info"),))

    def test_unknown_base_goes_to_catch_all(self) -> None:
        self.assertEqual(self.destinations("zed+x@example.net"), (mailbox("example.net", "dave"),))


class DomainTests(RoutingTestCase):
    def test_alias_of_domain_delivers_into_target_mailboxes(self) -> None:
        self.assertEqual(
            self.destinations("alice@example.org"), (mailbox("example.test", "alice"),)
        )

    def test_alias_of_domain_has_target_aliases(self) -> None:
        self.assertEqual(
            self.destinations("team@example.org"),
            (mailbox("example.test", "alice"), mailbox("example.test", "bob")),
        )

    def test_alias_of_domain_in_trace(self) -> None:
        self.assertEqual(
            route(self.config, "alice@example.org").trace[0],
            "example.org is an alias of example.test",
        )

    def test_local_part_is_case_insensitive(self) -> None:
        self.assertEqual(
            self.destinations("ALICE@example.test"), (mailbox("example.test", "alice"),)
        )

    def test_domain_is_case_insensitive(self) -> None:
        self.assertEqual(
            self.destinations("alice@EXAMPLE.Test"), (mailbox("example.test", "alice"),)
        )

    def test_unicode_domain(self) -> None:
        self.assertEqual(self.destinations("info@Bücher.example"), (mailbox(BUECHER, "info"),))

    def test_punycode_domain(self) -> None:
        self.assertEqual(self.destinations(f"info@{BUECHER.upper()}"), (mailbox(BUECHER, "info"),))

    def test_foreign_domain_is_relay_denied(self) -> None:
        self.assertIs(self.refusal("alice@elsewhere.test").reply, replies.RELAY_DENIED)

    def test_relay_denied_is_550_5_7_1(self) -> None:
        self.assertEqual(str(self.refusal("alice@elsewhere.test").reply)[:9], "550 5.7.1")

    def test_subdomain_is_not_ours(self) -> None:
        self.assertIs(self.refusal("alice@sub.example.test").reply, replies.RELAY_DENIED)

    def test_address_literal_is_relay_denied(self) -> None:
        self.assertIs(self.refusal("alice@[192.0.2.1]").reply, replies.RELAY_DENIED)

    def test_bad_syntax_raises_address_error(self) -> None:
        self.assertRaises(AddressError, route, self.config, "alice")


class PostmasterTests(RoutingTestCase):
    def test_bare_postmaster_is_first_domain_postmaster(self) -> None:
        self.assertEqual(self.destinations("postmaster"), (mailbox("example.test", "alice"),))

    def test_bare_postmaster_is_case_insensitive(self) -> None:
        self.assertEqual(self.destinations("PostMaster"), (mailbox("example.test", "alice"),))

    def test_bare_postmaster_address_names_the_domain(self) -> None:
        self.assertEqual(
            route(self.config, "postmaster").address, Address("postmaster", "example.test")
        )

    def test_domain_without_postmaster_falls_back_to_the_first_domains(self) -> None:
        """SPEC 4: plain.test... has one; a domain with none reaches alice, and says so."""
        config = load_config_text(
            CONFIG + "  lone.test:\n    mailboxes: [zed]\n", "/etc/mailx/mailx.yaml"
        )
        for address in ("postmaster@lone.test", "PostMaster@Lone.Test", "postmaster+x@lone.test"):
            decision = route(config, address)
            self.assertEqual(decision.destinations, (mailbox("example.test", "alice"),), address)
            self.assertIn(
                "lone.test has no postmaster: postmaster@lone.test goes to the first domain's,"
                " postmaster@example.test (SPEC section 4, RFC 5321 section 4.5.1)",
                decision.trace,
            )

    def test_postmaster_of_second_domain_reaches_across(self) -> None:
        self.assertEqual(
            self.destinations("postmaster@example.net"), (mailbox("example.test", "alice"),)
        )


class ForwardTests(unittest.TestCase):
    """Outside addresses: forwarded (SPEC section 8)."""

    def setUp(self) -> None:
        self.config = load_config_text(
            dedent("""\
                hostname: mx.example.test
                domains:
                  example.test:
                    mailboxes: [alice]
                    aliases:
                      postmaster: alice
                      boss: Someone@Elsewhere.TEST
                      both: [boss, alice]
                outbound:
                  srs_secret: SRS_SECRET
                """).replace("SRS_SECRET", SRS_SECRET),
            "/etc/mailx/mailx.yaml",
        )

    def test_outside_target_is_a_forward(self) -> None:
        self.assertEqual(
            route(self.config, "boss@example.test").destinations,
            (ForwardDestination("someone@elsewhere.test"),),
        )

    def test_forward_and_mailbox_together(self) -> None:
        self.assertEqual(
            route(self.config, "both@example.test").destinations,
            (
                ForwardDestination("someone@elsewhere.test"),
                MailboxDestination("example.test", "alice"),
            ),
        )

    def test_forward_in_trace(self) -> None:
        self.assertIn(
            "someone@elsewhere.test is an outside address → forwarded",
            route(self.config, "boss@example.test").trace,
        )


class RouterTests(RoutingTestCase):
    def test_router_matches_route(self) -> None:
        self.assertEqual(
            Router(self.config).route("team@example.test"), route(self.config, "team@example.test")
        )

    def test_expansion_of_alias(self) -> None:
        self.assertEqual(
            Router(self.config).expansion("example.test", "leads"),
            (mailbox("example.test", "alice"), mailbox("example.test", "bob")),
        )

    def test_route_is_a_value(self) -> None:
        self.assertIsInstance(route(self.config, "alice@example.test"), Route)


class ParseAddressTests(unittest.TestCase):
    def test_simple_address(self) -> None:
        self.assertEqual(parse_address("alice@example.test"), Address("alice", "example.test"))

    def test_local_part_and_domain_are_folded(self) -> None:
        self.assertEqual(parse_address("Alice@Example.TEST"), Address("alice", "example.test"))

    def test_needlessly_quoted_local_part_is_the_same_mailbox(self) -> None:
        self.assertEqual(parse_address('"alice"@example.test'), Address("alice", "example.test"))

    def test_quoted_local_part_with_space(self) -> None:
        self.assertEqual(parse_address('"john doe"@example.test').local, "john doe")

    def test_quoted_local_part_is_requoted_by_str(self) -> None:
        self.assertEqual(str(parse_address('"john doe"@example.test')), '"john doe"@example.test')

    def test_quoted_pair(self) -> None:
        self.assertEqual(parse_address(r'"a\"b"@example.test').local, 'a"b')

    def test_at_sign_in_quoted_local_part(self) -> None:
        self.assertEqual(parse_address('"a@b"@example.test'), Address("a@b", "example.test"))

    def test_unicode_domain_becomes_a_label(self) -> None:
        self.assertEqual(parse_address("info@Bücher.Example").domain, BUECHER)

    def test_ipv4_literal(self) -> None:
        self.assertEqual(parse_address("a@[192.0.2.1]").domain, "[192.0.2.1]")

    def test_ipv6_literal_is_normalized(self) -> None:
        self.assertEqual(parse_address("a@[IPv6:2001:DB8::1]").domain, "[IPv6:2001:db8::1]")

    def test_local_part_of_64_octets(self) -> None:
        self.assertEqual(parse_address("a" * 64 + "@example.test").local, "a" * 64)

    def test_rejects_bad_syntax(self) -> None:
        for text in [
            "",
            "alice",
            "@example.test",
            "alice@",
            "al ice@example.test",
            "alice@exa mple.test",
            "alice@example.test\r\n",
            "alice\n@example.test",
            "ali\x00ce@example.test",
            "alice\x7f@example.test",
            "<alice@example.test>",
            "a" * 65 + "@example.test",
            "alice@" + ".".join(["a" * 63] * 4) + ".test",
            "alice@-bad.test",
            "alice@example..test",
            "alice@example.test.",
            "alice@exa_mple.test",
            ".alice@example.test",
            "alice.@example.test",
            "a..b@example.test",
            '"alice@example.test',
            '"alice"example.test',
            '""@example.test',
            "ålice@example.test",
            '"ålice"@example.test',
            "alice@[999.1.1.1]",
            "alice@[IPv6:nope]",
            "alice@xn--zz.test",
        ]:
            with self.subTest(text=text):
                self.assertRaises(AddressError, parse_address, text)

    def test_address_error_is_a_value_error(self) -> None:
        self.assertTrue(issubclass(AddressError, ValueError))


class NormalizeDomainTests(unittest.TestCase):
    def test_lower_cases(self) -> None:
        self.assertEqual(normalize_domain("Example.TEST"), "example.test")

    def test_unicode_to_a_label(self) -> None:
        self.assertEqual(normalize_domain("bücher.example"), BUECHER)

    def test_label_of_64_octets_is_rejected(self) -> None:
        self.assertRaises(AddressError, normalize_domain, "a" * 64 + ".test")

    def test_label_of_63_octets_is_accepted(self) -> None:
        self.assertEqual(normalize_domain("a" * 63 + ".test"), "a" * 63 + ".test")


# ---------------------------------------------------------------------------
# Properties

LOCAL_NAMES = [
    "alice",
    "bob",
    "carol",
    "team",
    "leads",
    "all",
    "sales",
    "news",
    "postmaster",
    "zed",
]
DOMAINS = [
    "example.test",
    "example.net",
    "example.org",
    "plain.test",
    "bücher.example",
    "other.test",
]
PROPERTY_CONFIG = load_config_text(CONFIG, "/etc/mailx/mailx.yaml")


def _addresses() -> st.SearchStrategy[str]:
    """Mostly near-valid addresses, so the deep paths are explored too."""
    local = st.one_of(
        st.sampled_from(LOCAL_NAMES),
        st.builds(lambda n, t: f"{n}+{t}", st.sampled_from(LOCAL_NAMES), st.text(max_size=5)),
        st.text(max_size=10),
    )
    domain = st.one_of(st.sampled_from(DOMAINS), st.text(max_size=12))
    return st.one_of(st.text(), st.builds(lambda lp, d: f"{lp}@{d}", local, domain))


def _random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))


def _outcome(address: str) -> tuple:
    """What a recipient gets: its destinations, or the reply refusing it."""
    try:
        return ("accepted", route(PROPERTY_CONFIG, address).destinations)
    except SMTPReplyError as e:
        return ("refused", e.reply)


class RoutingProperties(unittest.TestCase):
    @settings(max_examples=500)
    @given(_addresses())
    def test_route_raises_only_reply_or_address_errors(self, text: str) -> None:
        try:
            result = route(PROPERTY_CONFIG, text)
        except (SMTPReplyError, AddressError):
            return
        self.assertTrue(result.destinations)

    @given(st.data(), st.sampled_from(LOCAL_NAMES[:-1]), st.sampled_from(DOMAINS[:-1]))
    def test_case_variations_route_identically(
        self, data: st.DataObject, local: str, domain: str
    ) -> None:
        varied = f"{_random_case(data.draw, local)}@{_random_case(data.draw, domain)}"
        self.assertEqual(_outcome(varied), _outcome(f"{local}@{domain}"))

    @given(_addresses())
    def test_destinations_are_never_duplicated(self, text: str) -> None:
        try:
            destinations = route(PROPERTY_CONFIG, text).destinations
        except (SMTPReplyError, AddressError):
            return
        self.assertEqual(len(destinations), len(set(destinations)))

    @given(st.text())
    def test_parsed_address_round_trips(self, text: str) -> None:
        try:
            address = parse_address(text)
        except AddressError:
            return
        self.assertEqual(parse_address(str(address)), address)


@st.composite
def _alias_graphs(draw: st.DrawFn) -> tuple[list[str], dict[str, list[str]]]:
    """Mailboxes and acyclic aliases: each alias points at mailboxes and earlier aliases."""
    mailboxes = [f"m{i}" for i in range(draw(st.integers(1, 5)))]
    aliases: dict[str, list[str]] = {}
    for i in range(draw(st.integers(0, 8))):
        names = mailboxes + list(aliases)
        aliases[f"a{i}"] = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4))
    return mailboxes, aliases


def _reference_expansion(name: str, mailboxes: list[str], aliases: dict[str, list[str]]) -> set:
    if name in mailboxes:
        return {name}
    return set().union(*(_reference_expansion(t, mailboxes, aliases) for t in aliases[name]))


class AliasGraphProperties(unittest.TestCase):
    @settings(max_examples=60, deadline=None)
    @given(_alias_graphs())
    def test_alias_delivers_once_to_each_reachable_mailbox(self, graph: tuple) -> None:
        mailboxes, aliases = graph
        document = {
            "hostname": "mx.example.test",
            "domains": {
                "example.test": {
                    "mailboxes": mailboxes,
                    "aliases": {"postmaster": mailboxes[0], **aliases},
                }
            }
        }
        config = load_config_text(yaml.safe_dump(document), "/etc/mailx/mailx.yaml")
        for alias in aliases:
            destinations = route(config, f"{alias}@example.test").destinations
            self.assertEqual(len(destinations), len(set(destinations)))
            self.assertEqual(
                {d.mailbox for d in destinations}, _reference_expansion(alias, mailboxes, aliases)
            )
