//! The simulator's meetings: created through the API or configured up front, started with the
//! host password (or the guest password where the meeting allows it), their control tokens
//! (issued only while a meeting runs, bound to it, kept alive by a keep-alive call, ended by a
//! stop), and the check every control API makes.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::state::{random_token, CAP};
use super::SimMeeting;

/// Where a meeting is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeetingState {
    /// Created, not started: no control token can be had.
    Scheduled,
    /// Activated (`conferences/start`): control APIs work.
    Started,
    /// Stopped: gone for good, as far as the API is concerned.
    Ended,
}

impl MeetingState {
    /// `conferenceState` as the upstream writes it.
    fn as_str(self) -> &'static str {
        match self {
            MeetingState::Scheduled => "Schedule",
            MeetingState::Started => "Created",
            MeetingState::Ended => "Destroyed",
        }
    }
}

pub(crate) struct Meeting {
    id: String,
    /// The app whose token created it; `None`: configured up front, any app's.
    app: Option<String>,
    subject: String,
    chair_password: String,
    guest_password: String,
    allow_guest_start: bool,
    length_minutes: u64,
    media_types: String,
    state: MeetingState,
}

struct ControlToken {
    conference: String,
    /// The app whose access token came with the request that got it (`""`: none did), for
    /// the per-app throttling of the control calls made with it.
    app: String,
    expires_at: Instant,
}

/// A control token as issued or kept alive.
pub(crate) struct Issued {
    pub(crate) token: String,
    pub(crate) remaining: Duration,
}

/// Why a meeting call is refused; the handler maps each to the upstream's status and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MeetingError {
    /// Unknown or ended meeting, another app's meeting, or a wrong password (400
    /// `MMC.111072065`, as the upstream documents for both).
    NotFoundOrAuthFailed,
    /// A control token for a meeting that has not been started (400; the docs say it fails and
    /// name no code: `SIM.CONF_NOT_STARTED` is ours).
    NotStarted,
    /// The control token is missing, unknown, expired or ended (401 `SIM.CONF_TOKEN_INVALID`,
    /// ours).
    TokenInvalid,
    /// The control token belongs to another meeting (403 `SIM.CONF_TOKEN_MISMATCH`, ours).
    TokenMismatch,
}

/// What happened to control tokens, for tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ControlStats {
    /// Calls to `conferences/token`, whatever their outcome.
    pub token_requests: usize,
    /// New tokens issued (with the host password).
    pub issued: usize,
    /// Keep-alives that extended a live token.
    pub keepalives: usize,
}

#[derive(Default)]
pub(crate) struct Meetings {
    meetings: HashMap<String, Meeting>,
    tokens: HashMap<String, ControlToken>,
    order: VecDeque<String>,
    pub(crate) stats: ControlStats,
}

impl Meetings {
    pub(crate) fn new(configured: &[SimMeeting]) -> Meetings {
        let mut m = Meetings::default();
        for c in configured {
            m.meetings.insert(
                c.conference_id.clone(),
                Meeting {
                    id: c.conference_id.clone(),
                    app: None,
                    subject: c.subject.clone(),
                    chair_password: c.chair_password.clone(),
                    guest_password: c.guest_password.clone(),
                    allow_guest_start: c.allow_guest_start,
                    length_minutes: 60,
                    media_types: "Voice,Video,Data".to_owned(),
                    state: MeetingState::Scheduled,
                },
            );
        }
        m
    }

    /// `POST /v1/mmc/management/conferences`: a new scheduled meeting with random passwords
    /// (9-digit id, 6-digit passwords, as the upstream's look), returned in its shape.
    pub(crate) fn create(&mut self, app: &str, req: &serde_json::Value) -> serde_json::Value {
        while self.meetings.len() >= CAP {
            // Oldest-first is not tracked for meetings; ended ones go first, then any.
            let victim = self
                .meetings
                .iter()
                .find(|(_, m)| m.state == MeetingState::Ended)
                .or_else(|| self.meetings.iter().next())
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => self.meetings.remove(&k),
                None => break,
            };
        }
        let id = loop {
            let id = format!("9{:08}", rand::random::<u32>() % 100_000_000);
            if !self.meetings.contains_key(&id) {
                break id;
            }
        };
        let digits = || format!("{:06}", rand::random::<u32>() % 1_000_000);
        let config = req.get("confConfigInfo");
        let meeting = Meeting {
            id: id.clone(),
            app: Some(app.to_owned()),
            subject: req
                .get("subject")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned(),
            chair_password: digits(),
            guest_password: req
                .get("guestPasswd")
                .and_then(|v| v.as_str())
                .filter(|p| !p.is_empty())
                .map_or_else(digits, str::to_owned),
            allow_guest_start: config
                .and_then(|c| c.get("allowGuestStartConf"))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            length_minutes: req
                .get("length")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(60),
            media_types: req
                .get("mediaTypes")
                .and_then(|v| v.as_str())
                .unwrap_or("Voice")
                .to_owned(),
            state: MeetingState::Scheduled,
        };
        let info = meeting.info();
        self.meetings.insert(id, meeting);
        serde_json::Value::Array(vec![info])
    }

    fn visible(&self, app: &str, id: &str) -> Option<&Meeting> {
        self.meetings
            .get(id)
            .filter(|m| m.state != MeetingState::Ended)
            .filter(|m| m.app.as_deref().is_none_or(|a| a == app))
    }

    /// `conferences/start` with the host password, or the guest password where allowed.
    pub(crate) fn start(
        &mut self,
        app: &str,
        id: &str,
        password: &str,
    ) -> Result<(), MeetingError> {
        let m = self
            .visible(app, id)
            .ok_or(MeetingError::NotFoundOrAuthFailed)?;
        let chair = !password.is_empty() && password == m.chair_password;
        let guest = m.allow_guest_start && !password.is_empty() && password == m.guest_password;
        if !(chair || guest) {
            return Err(MeetingError::NotFoundOrAuthFailed);
        }
        if let Some(m) = self.meetings.get_mut(id) {
            m.state = MeetingState::Started;
        }
        Ok(())
    }

    /// `conferences/token`: a keep-alive when `presented` is a live token of this meeting
    /// (the password is not checked then), else a new token for the host password.
    pub(crate) fn control_token(
        &mut self,
        app: &str,
        id: &str,
        presented: Option<&str>,
        password: &str,
        lifetime: Duration,
        now: Instant,
    ) -> Result<Issued, MeetingError> {
        self.stats.token_requests += 1;
        if let Some(token) = presented {
            if let Some(t) = self
                .tokens
                .get_mut(token)
                .filter(|t| t.conference == id && t.expires_at > now)
            {
                t.expires_at = now + lifetime;
                self.stats.keepalives += 1;
                return Ok(Issued {
                    token: token.to_owned(),
                    remaining: lifetime,
                });
            }
        }
        // The host password is the credential here (the access token is optional), so the
        // meeting is found whichever app created it.
        let m = self
            .meetings
            .get(id)
            .filter(|m| m.state != MeetingState::Ended)
            .ok_or(MeetingError::NotFoundOrAuthFailed)?;
        if password.is_empty() || password != m.chair_password {
            return Err(MeetingError::NotFoundOrAuthFailed);
        }
        if m.state != MeetingState::Started {
            return Err(MeetingError::NotStarted);
        }
        self.sweep(now);
        let token = random_token(64);
        self.tokens.insert(
            token.clone(),
            ControlToken {
                conference: id.to_owned(),
                app: app.to_owned(),
                expires_at: now + lifetime,
            },
        );
        self.order.push_back(token.clone());
        self.stats.issued += 1;
        Ok(Issued {
            token,
            remaining: lifetime,
        })
    }

    /// What every control API checks: a live token of the meeting named in the request.
    /// Returns the app it acts for.
    pub(crate) fn check(&self, token: &str, id: &str, now: Instant) -> Result<&str, MeetingError> {
        let t = self
            .tokens
            .get(token)
            .filter(|t| t.expires_at > now)
            .ok_or(MeetingError::TokenInvalid)?;
        if t.conference != id {
            return Err(MeetingError::TokenMismatch);
        }
        Ok(&t.app)
    }

    /// `conferences/stop`: the meeting ends and its control tokens with it.
    pub(crate) fn stop(&mut self, id: &str) {
        if let Some(m) = self.meetings.get_mut(id) {
            m.state = MeetingState::Ended;
        }
        self.tokens.retain(|_, t| t.conference != id);
    }

    /// Server-side revocation of every control token (a restart of the control service).
    pub(crate) fn revoke_tokens(&mut self) {
        self.tokens.clear();
        self.order.clear();
    }

    pub(crate) fn state(&self, id: &str) -> Option<MeetingState> {
        self.meetings.get(id).map(|m| m.state)
    }

    /// A meeting's passwords (chair, guest), for tests.
    pub(crate) fn passwords(&self, id: &str) -> Option<(String, String)> {
        self.meetings
            .get(id)
            .map(|m| (m.chair_password.clone(), m.guest_password.clone()))
    }

    /// Drops expired tokens, oldest first, and keeps the store under its cap.
    fn sweep(&mut self, now: Instant) {
        while let Some(front) = self.order.front() {
            let dead = self.tokens.get(front).is_none_or(|t| t.expires_at <= now);
            if !dead && self.order.len() < CAP {
                break;
            }
            if let Some(old) = self.order.pop_front() {
                self.tokens.remove(&old);
            }
        }
    }
}

impl Meeting {
    /// The upstream's `ConferenceInfo` for this meeting (the fields a client reads).
    fn info(&self) -> serde_json::Value {
        serde_json::json!({
            "conferenceID": self.id,
            "mediaTypes": self.media_types,
            "subject": self.subject,
            "size": 0,
            "timeZoneID": "56",
            "length": self.length_minutes,
            "conferenceState": self.state.as_str(),
            "language": "zh-CN",
            "passwordEntry": [
                { "conferenceRole": "chair", "password": self.chair_password },
                { "conferenceRole": "general", "password": self.guest_password },
            ],
            "conferenceType": 0,
            "confType": "IMMEDIATELY",
            "chairJoinUri": format!("https://simulator.invalid/#/j/{}/chair", self.id),
            "guestJoinUri": format!("https://simulator.invalid/#/j/{}/guest", self.id),
            "confConfigInfo": { "allowGuestStartConf": self.allow_guest_start },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Meetings {
        Meetings::new(&[SimMeeting::demo()])
    }

    #[test]
    fn a_meeting_starts_with_its_host_password_only() {
        let mut m = demo();
        assert_eq!(
            m.start("app", "914087436", "654321"),
            Err(MeetingError::NotFoundOrAuthFailed),
            "the guest password starts only meetings that allow it"
        );
        assert_eq!(
            m.start("app", "000", "123456"),
            Err(MeetingError::NotFoundOrAuthFailed)
        );
        assert_eq!(m.start("app", "914087436", "123456"), Ok(()));
        assert_eq!(m.state("914087436"), Some(MeetingState::Started));
    }

    #[test]
    fn guests_start_meetings_that_allow_it() {
        let mut m = demo();
        let created = m.create(
            "app",
            &serde_json::json!({"subject": "s", "confConfigInfo": {"allowGuestStartConf": true}}),
        );
        let id = created[0]["conferenceID"].as_str().expect("id").to_owned();
        assert_eq!(id.len(), 9);
        let (_, guest) = m.passwords(&id).expect("meeting");
        assert_eq!(created[0]["passwordEntry"][1]["password"], guest.as_str());
        assert_eq!(
            m.start("other-app", &id, &guest),
            Err(MeetingError::NotFoundOrAuthFailed),
            "another app's meeting is not found"
        );
        assert_eq!(m.start("app", &id, &guest), Ok(()));
    }

    #[test]
    fn control_tokens_need_a_started_meeting_and_end_with_it() {
        let mut m = demo();
        let now = Instant::now();
        let life = Duration::from_secs(30);
        let id = "914087436";
        assert_eq!(
            m.control_token("a", id, None, "123456", life, now).err(),
            Some(MeetingError::NotStarted)
        );
        m.start("a", id, "123456").expect("starts");
        assert_eq!(
            m.control_token("a", id, None, "bad", life, now).err(),
            Some(MeetingError::NotFoundOrAuthFailed)
        );
        let t = m
            .control_token("a", id, None, "123456", life, now)
            .expect("token")
            .token;
        assert_eq!(m.check(&t, id, now), Ok("a"));
        assert_eq!(
            m.check(&t, "914000000", now),
            Err(MeetingError::TokenMismatch)
        );
        // A keep-alive extends it, without the password.
        let later = now + Duration::from_secs(20);
        let k = m
            .control_token("a", id, Some(&t), "", life, later)
            .expect("kept");
        assert_eq!(k.token, t);
        assert_eq!(m.check(&t, id, now + Duration::from_secs(45)), Ok("a"));
        assert_eq!(
            m.check(&t, id, now + Duration::from_secs(51)),
            Err(MeetingError::TokenInvalid)
        );
        m.stop(id);
        assert_eq!(m.check(&t, id, later), Err(MeetingError::TokenInvalid));
        assert_eq!(
            m.control_token("a", id, Some(&t), "123456", life, later)
                .err(),
            Some(MeetingError::NotFoundOrAuthFailed),
            "a stopped meeting is gone"
        );
        assert_eq!(
            m.stats,
            ControlStats {
                token_requests: 5,
                issued: 1,
                keepalives: 1
            }
        );
    }
}
