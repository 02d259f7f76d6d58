//! The simulator's routing table: the upstream operations (compiled-in TSV) plus the auth endpoints.

use hyper::Method;

const OPERATIONS_TSV: &str = include_str!("../data/meeting-operations.tsv");

/// How the simulator answers a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    AppAuth,
    /// Auth endpoints the simulator does not model (account/password, proxy).
    Unsupported,
    RefreshToken,
    ValidateToken,
    DeleteToken,
    /// `GET /v1/mmc/control/conferences/token`: host password instead of a control token.
    ConfToken,
    StartMeeting,
    /// `POST /v1/mmc/management/conferences`: creates a meeting.
    CreateMeeting,
    /// `PUT /v1/mmc/control/conferences/stop`: a control API that ends the meeting.
    StopMeeting,
    /// `GET /v1/mmc/control/conferences/wsToken`: a control API that returns a one-time token.
    WsToken,
    /// A control API that authenticates with `X-Conference-Authorization`.
    Control,
    /// Everything else: `X-Access-Token`.
    Business,
}

impl Kind {
    /// Business routes get token auth, throttling, faults and the APIG debug headers.
    pub(crate) fn is_business(self) -> bool {
        matches!(
            self,
            Kind::ConfToken
                | Kind::StartMeeting
                | Kind::CreateMeeting
                | Kind::StopMeeting
                | Kind::WsToken
                | Kind::Control
                | Kind::Business
        )
    }

    /// Control APIs: authenticated by a meeting's control token.
    pub(crate) fn is_control(self) -> bool {
        matches!(self, Kind::StopMeeting | Kind::WsToken | Kind::Control)
    }
}

#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) name: String,
    method: Method,
    template: String,
    segments: Vec<Segment>,
    pub(crate) kind: Kind,
}

#[derive(Debug)]
enum Segment {
    Literal(String),
    Param,
}

#[derive(Debug)]
pub(crate) struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    pub(crate) fn load() -> Self {
        let mut routes = vec![
            Route::new(
                "create_app_id_token",
                Method::POST,
                "/v2/usg/acs/auth/appauth",
                Kind::AppAuth,
            ),
            Route::new(
                "create_token",
                Method::POST,
                "/v1/usg/acs/auth/account",
                Kind::Unsupported,
            ),
            Route::new(
                "create_proxy_token",
                Method::POST,
                "/v1/usg/acs/auth/proxy",
                Kind::Unsupported,
            ),
        ];
        for line in OPERATIONS_TSV.lines().skip(1) {
            let cols: Vec<&str> = line.split('\t').collect();
            let (Some(name), Some(method), Some(path)) = (cols.first(), cols.get(1), cols.get(2))
            else {
                continue;
            };
            let Ok(method) = Method::from_bytes(method.trim().as_bytes()) else {
                continue;
            };
            let headers = cols.get(5).copied().unwrap_or("");
            let kind = match (*name, method.as_str(), *path) {
                (_, "PUT", "/v1/usg/acs/token") => Kind::RefreshToken,
                (_, "DELETE", "/v1/usg/acs/token") => Kind::DeleteToken,
                (_, "POST", "/v1/usg/acs/token/validate") => Kind::ValidateToken,
                (_, "GET", "/v1/mmc/control/conferences/token") => Kind::ConfToken,
                (_, "POST", "/v1/mmc/management/conferences/start") => Kind::StartMeeting,
                (_, "POST", "/v1/mmc/management/conferences") => Kind::CreateMeeting,
                (_, "PUT", "/v1/mmc/control/conferences/stop") => Kind::StopMeeting,
                (_, "GET", "/v1/mmc/control/conferences/wsToken") => Kind::WsToken,
                // The TSV's header column says which control APIs take a control token;
                // the few /v1/mmc/control paths without it (inviteWithPwd,
                // queryMgmtSiteStatus) authenticate like any other API.
                _ if headers
                    .split(',')
                    .any(|h| h.eq_ignore_ascii_case("X-Conference-Authorization")) =>
                {
                    Kind::Control
                }
                _ => Kind::Business,
            };
            routes.push(Route::new(name, method, path, kind));
        }
        Self { routes }
    }

    /// The route for a concrete path (no query). Among templates that match, the one whose
    /// first differing segment is literal wins, so `/conferences/history` beats
    /// `/conferences/{conference_id}`.
    pub(crate) fn find(&self, method: &Method, path: &str) -> Option<&Route> {
        let parts: Vec<&str> = path.split('/').collect();
        self.routes
            .iter()
            .filter(|r| r.method == *method && r.matches(&parts))
            .max_by(|a, b| a.literal_mask().cmp(&b.literal_mask()))
    }

    /// Resolves an operation name or `"METHOD /path"` (template or concrete) to an operation name.
    pub(crate) fn resolve_name(&self, route: &str) -> Option<String> {
        if let Some((method, path)) = route.split_once(' ') {
            let method = Method::from_bytes(method.trim().as_bytes()).ok()?;
            let path = path.trim();
            if let Some(r) = self
                .routes
                .iter()
                .find(|r| r.method == method && r.template == path)
            {
                return Some(r.name.clone());
            }
            return self.find(&method, path).map(|r| r.name.clone());
        }
        self.routes
            .iter()
            .find(|r| r.name == route)
            .map(|r| r.name.clone())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.routes.len()
    }
}

impl Route {
    fn new(name: &str, method: Method, template: &str, kind: Kind) -> Self {
        let segments = template
            .split('/')
            .map(|s| {
                if s.starts_with('{') && s.ends_with('}') {
                    Segment::Param
                } else {
                    Segment::Literal(s.to_owned())
                }
            })
            .collect();
        Self {
            name: name.to_owned(),
            method,
            template: template.to_owned(),
            segments,
            kind,
        }
    }

    fn matches(&self, parts: &[&str]) -> bool {
        parts.len() == self.segments.len()
            && self.segments.iter().zip(parts).all(|(s, p)| match s {
                Segment::Literal(l) => l == p,
                Segment::Param => !p.is_empty(),
            })
    }

    fn literal_mask(&self) -> Vec<bool> {
        self.segments
            .iter()
            .map(|s| matches!(s, Segment::Literal(_)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_loads_every_operation_plus_auth() {
        let r = Routes::load();
        assert_eq!(r.len(), 199 + 3);
    }

    #[test]
    fn literal_beats_template_and_kinds_are_right() {
        let r = Routes::load();
        let name = |m: Method, p: &str| r.find(&m, p).map(|x| (x.name.clone(), x.kind));
        assert_eq!(
            name(Method::GET, "/v1/mmc/control/conferences/token").map(|x| x.1),
            Some(Kind::ConfToken)
        );
        assert_eq!(
            name(Method::PUT, "/v1/mmc/control/conferences/lock").map(|x| x.1),
            Some(Kind::Control)
        );
        assert_eq!(
            name(Method::POST, "/v1/mmc/control/conferences/inviteWithPwd").map(|x| x.1),
            Some(Kind::Business)
        );
        let history = name(Method::GET, "/v1/wss/webinar/open/conferences/history").unwrap();
        let by_id = name(Method::GET, "/v1/wss/webinar/open/conferences/12345").unwrap();
        assert_ne!(history.0, by_id.0);
        assert!(name(Method::GET, "/v1/usg/dcs/corp/member/").is_none());
        assert!(name(Method::PATCH, "/v1/mmc/management/conferences/start").is_none());
        assert_eq!(
            r.resolve_name("POST /v1/mmc/management/conferences/start")
                .as_deref(),
            Some("start_meeting")
        );
        assert_eq!(
            r.resolve_name("GET /v1/usg/dcs/corp/member/{account}"),
            r.resolve_name("GET /v1/usg/dcs/corp/member/alice")
        );
        assert_eq!(
            r.resolve_name("start_meeting").as_deref(),
            Some("start_meeting")
        );
        assert_eq!(r.resolve_name("nope"), None);
    }
}
