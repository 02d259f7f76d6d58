//! Unit tests of the control sessions: ownership, remembered passwords, bounds, timing.

use super::*;
use crate::clock::FakeClock;

fn controls(cfg: ControlConfig) -> (Arc<Controls>, Arc<FakeClock>) {
    let clock = Arc::new(FakeClock::new(1_000_000));
    let c = Controls::new(cfg, clock.clone(), Arc::new(Metrics::new()));
    (c, clock)
}

fn pw(s: &str) -> Option<SecretString> {
    Some(SecretString::from(s.to_owned()))
}

fn app() -> Arc<str> {
    Arc::from("default")
}

fn client(name: &str) -> Owner {
    Some(Arc::from(name))
}

#[test]
fn keepalive_comes_before_expiry_and_a_token_is_never_injected_at_its_end() {
    let (ka, exp) = schedule(0, Duration::from_secs(1800), 0.0);
    assert_eq!((ka, exp), (1_440_000, 1_770_000));
    let (ka, _) = schedule(0, Duration::from_secs(1800), 1.0);
    assert_eq!(ka, 1_350_000);
    // Short lifetimes (tests use seconds): still before the end, with a margin.
    let (ka, exp) = schedule(10, Duration::from_secs(4), 0.5);
    assert!(10 < ka && ka < exp && exp < 4010, "{ka} {exp}");
}

#[test]
fn a_call_without_a_password_or_session_goes_as_it_is() {
    let (c, _) = controls(ControlConfig::default());
    assert!(c
        .session_for(&app(), "914087436", &None, None)
        .expect("no refusal")
        .is_none());
    assert!(c.is_empty());
}

#[test]
fn a_session_belongs_to_its_creator_and_to_who_proves_the_password() {
    let (c, _) = controls(ControlConfig::default());
    let a = client("a");
    let s = c
        .session_for(&app(), "914087436", &a, pw("123456"))
        .expect("ok")
        .expect("created");
    // The owner needs no password any more.
    let again = c
        .session_for(&app(), "914087436", &a, None)
        .expect("ok")
        .expect("same");
    assert!(Arc::ptr_eq(&s, &again));
    // Another client without the password, or with a wrong one, is refused.
    let b = client("b");
    for presented in [None, pw("000000")] {
        let e = c
            .session_for(&app(), "914087436", &b, presented)
            .expect_err("refused");
        assert_eq!(e.code(), "MEETGATE.FORBIDDEN");
        assert!(!e.to_string().contains("123456"));
    }
    // With the password it may use the session, and then without it.
    assert!(c
        .session_for(&app(), "914087436", &b, pw("123456"))
        .expect("ok")
        .is_some());
    assert!(c
        .session_for(&app(), "914087436", &b, None)
        .expect("ok")
        .is_some());
    // Another app's meeting of the same id is another session.
    assert!(c
        .session_for(&Arc::from("other"), "914087436", &client("c"), None)
        .expect("ok")
        .is_none());
}

#[test]
fn a_start_through_meetgate_leaves_its_password_unless_told_not_to() {
    let (c, _) = controls(ControlConfig::default());
    c.remember_start(&app(), "914087436", &None, "123456");
    let s = c
        .session_for(&app(), "914087436", &None, None)
        .expect("ok")
        .expect("remembered");
    assert!(s.password_is("123456"));
    assert!(!format!("{s:?}").contains("123456"));
    // A start of the same meeting with another password replaces it; the same again still
    // matches.
    c.remember_start(&app(), "914087436", &None, "654321");
    assert!(s.password_is("654321") && !s.password_is("123456"));
    c.remember_start(&app(), "914087436", &None, "654321");
    assert!(s.password_is("654321"));
    assert_eq!(c.len(), 1);

    let (c, _) = controls(ControlConfig {
        remember_start_password: false,
        ..ControlConfig::default()
    });
    c.remember_start(&app(), "914087436", &None, "123456");
    assert!(c.is_empty());
}

#[test]
fn sessions_are_bounded_least_recently_used_first_and_idle_out() {
    let (c, clock) = controls(ControlConfig {
        max_conferences: 2,
        idle_timeout: Duration::from_secs(60),
        ..ControlConfig::default()
    });
    c.remember_start(&app(), "1", &None, "p");
    clock.advance_ms(2_000);
    c.remember_start(&app(), "2", &None, "p");
    clock.advance_ms(2_000);
    // "1" is used again, so "2" is the least recently used when "3" arrives.
    assert!(c
        .session_for(&app(), "1", &None, None)
        .expect("ok")
        .is_some());
    c.remember_start(&app(), "3", &None, "p");
    assert_eq!(c.len(), 2);
    assert!(c
        .session_for(&app(), "2", &None, None)
        .expect("ok")
        .is_none());
    clock.advance_ms(61_000);
    assert_eq!(c.evict_idle(), 2);
    assert!(c.is_empty());
}

#[test]
fn a_refused_token_is_dropped_only_if_it_is_still_the_current_one() {
    let (c, clock) = controls(ControlConfig::default());
    let s = c
        .session_for(&app(), "914087436", &None, pw("123456"))
        .expect("ok")
        .expect("created");
    let now = clock.now_ms();
    assert!(s.store("tok-1", now, Duration::from_secs(1800)));
    let (_, g1, _) = s.current(now).expect("valid");
    // A keep-alive that returns the same token keeps its generation.
    assert!(s.store("tok-1", now, Duration::from_secs(1800)));
    assert_eq!(s.current(now).map(|t| t.1), Some(g1));
    assert!(s.store("tok-2", now, Duration::from_secs(1800)));
    let (_, g2, _) = s.current(now).expect("valid");
    assert_ne!(g1, g2);
    c.invalidate(&s, g1);
    assert!(
        s.current(now).is_some(),
        "an older refusal leaves the new token"
    );
    c.invalidate(&s, g2);
    assert!(s.current(now).is_none());
}

#[test]
fn stop_key_change_and_disabling_end_sessions() {
    let (c, _) = controls(ControlConfig::default());
    c.remember_start(&app(), "1", &None, "p");
    c.remember_start(&app(), "2", &None, "p");
    c.remember_start(&Arc::from("other"), "3", &None, "p");
    c.end("default", "1");
    assert_eq!(c.len(), 2);
    c.end_app("default");
    assert_eq!(c.len(), 1);
    c.reconfigure(ControlConfig {
        enabled: false,
        ..ControlConfig::default()
    });
    assert!(c.is_empty());
}

#[test]
fn conference_ids_come_from_the_query_decoded_and_plain() {
    assert_eq!(
        conference_id(Some("a=1&conferenceID=914087436")).as_deref(),
        Some("914087436")
    );
    assert_eq!(
        conference_id(Some("conferenceID=98%2076")).as_deref(),
        None,
        "a space is not kept"
    );
    assert_eq!(conference_id(Some("conferenceID=")), None);
    assert_eq!(conference_id(None), None);
    assert_eq!(
        conference_id(Some(&format!("conferenceID={}", "9".repeat(65)))),
        None
    );
}
