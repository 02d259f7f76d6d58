#!/usr/bin/env python3
"""Drive the official, unmodified Huawei Cloud Meeting SDK (huaweicloudsdkmeeting 3.1.219)
against an endpoint (meetgate's TLS listener, or the embedded simulator directly).

    python drive_sdk.py --endpoint https://127.0.0.1:PORT --app-id ID --app-key-env ENVVAR \
        [--user-id U] [--ca-file PEM | --insecure]

The app key is read from the environment variable named by --app-key-env; it is never taken
from argv and never printed. The SDK signs in with App ID authentication (single tenant), then
the calls below run in order. One JSON object goes to stdout:

    {"ok": bool, "calls": [{"operation", "method", "path", "status", "request_id",
                            ["error_code", "error_msg"]}, ...],
     "http": [every HTTP exchange the SDK made, sign-in included:
              method, path, query, status, request_id],
     "error": "..." | null}

Exit status: 0 if every call returned 2xx, 1 if any call failed, 2 on bad usage.
"""

# The SDK writes ~/.huaweicloud/application_id (its User-Agent's app/<uuid>): point HOME at a
# fresh temporary directory before anything from the SDK is imported or used.
import atexit
import os
import shutil
import tempfile

_HOME = tempfile.mkdtemp(prefix="drive-sdk-home-")
os.environ["HOME"] = _HOME
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from huaweicloudsdkcore.exceptions import exceptions as sdk_exc  # noqa: E402
from huaweicloudsdkcore.http.http_config import HttpConfig  # noqa: E402
from huaweicloudsdkcore.http.http_handler import HttpHandler  # noqa: E402
from huaweicloudsdkmeeting.v1 import (  # noqa: E402
    DeleteDepartmentRequest,
    LockMeetingRequest,
    MeetingClient,
    ModUserDTO,
    MuteMeetingRequest,
    RestLockReqBody,
    RestMuteReqBody,
    SearchMeetingsRequest,
    ShowMeetingDetailRequest,
    StartMeetingRequest,
    StartRequest,
    UpdateUserRequest,
)
from huaweicloudsdkmeeting.v1.meeting_credentials import (  # noqa: E402
    AuthTypeEnum,
    MeetingCredentials,
    TenantSceneEnum,
)

CONFERENCE_ID = "914087436"
CONFERENCE_PASSWORD = "123456"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", required=True, help="e.g. https://127.0.0.1:8443")
    p.add_argument("--app-id", required=True)
    p.add_argument("--app-key-env", required=True,
                   help="name of the environment variable holding the app key")
    p.add_argument("--user-id", default=None,
                   help="third-party user id to sign in as (default: the corp admin)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--ca-file", help="PEM bundle to verify the endpoint's certificate with")
    tls.add_argument("--insecure", action="store_true", help="do not verify TLS")
    return p.parse_args()


def operations():
    """(SDK method name, HTTP method, path template, request factory), called in this order."""
    return [
        ("start_meeting", "POST", "/v1/mmc/management/conferences/start",
         lambda: StartMeetingRequest(
             body=StartRequest(conference_id=CONFERENCE_ID, password=CONFERENCE_PASSWORD))),
        # Meeting control after the start, with no X-Conference-Authorization: the endpoint
        # (meetgate) is expected to supply the control token.
        ("lock_meeting", "PUT", "/v1/mmc/control/conferences/lock",
         lambda: LockMeetingRequest(conference_id=CONFERENCE_ID, body=RestLockReqBody(is_lock=1))),
        ("mute_meeting", "PUT", "/v1/mmc/control/conferences/mute",
         lambda: MuteMeetingRequest(conference_id=CONFERENCE_ID,
                                    body=RestMuteReqBody(is_mute=1, allow_unmute_by_oneself=1))),
        # GET with query parameters, one of them needing percent-encoding (a space).
        ("search_meetings", "GET", "/v1/mmc/management/conferences",
         lambda: SearchMeetingsRequest(offset=0, limit=10, query_all=True,
                                       search_key="weekly sync")),
        ("show_meeting_detail", "GET", "/v1/mmc/management/conferences/confDetail",
         lambda: ShowMeetingDetailRequest(conference_id=CONFERENCE_ID, offset=0, limit=20)),
        # PUT with a path parameter, a query parameter and a JSON body.
        ("update_user", "PUT", "/v1/usg/dcs/corp/member/{account}",
         lambda: UpdateUserRequest(account="alice", account_type=0,
                                   body=ModUserDTO(name="Alice", title="Engineer"))),
        ("delete_department", "DELETE", "/v1/usg/dcs/corp/dept/{dept_code}",
         lambda: DeleteDepartmentRequest(dept_code="dept-0001")),
    ]


class Recorder:
    """An SDK response handler: records every HTTP exchange (no headers or bodies, so no tokens)."""

    def __init__(self):
        self.exchanges = []

    def __call__(self, **kwargs):
        resp = kwargs.get("response")
        if resp is None:
            return
        self.exchanges.append({
            "method": resp.request.method,
            "path": urlsplit(resp.request.url).path,
            "query": urlsplit(resp.request.url).query,
            "status": resp.status_code,
            "request_id": resp.headers.get("X-Request-Id"),
        })


def main():
    args = parse_args()
    app_key = os.environ.get(args.app_key_env)
    if not app_key:
        print(json.dumps({"ok": False, "calls": [], "http": [],
                          "error": "environment variable %s is unset or empty" % args.app_key_env}))
        return 2

    def scrub(text):
        # Belt and braces: nothing the SDK or the server says should contain the key.
        return None if text is None else str(text).replace(app_key, "[redacted]")

    config = HttpConfig.get_default_config()
    config.timeout = (10, 30)
    if args.insecure:
        config.ignore_ssl_verification = True
        import urllib3  # a dependency of the SDK; silence its per-request warning
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    elif args.ca_file:
        config.ssl_ca_cert = args.ca_file

    credentials = (MeetingCredentials()
                   .with_auth_type_enum(AuthTypeEnum.APP_ID)
                   .with_tenant_scene_enum(TenantSceneEnum.SINGLE_TENANT)
                   .with_app_id(args.app_id)
                   .with_app_key(app_key))
    if args.user_id is not None:
        credentials = credentials.with_user_id(args.user_id)

    recorder = Recorder()
    client = (MeetingClient.new_builder()
              .with_http_config(config)
              .with_credentials(credentials)
              .with_endpoint(args.endpoint)
              .with_http_handler(HttpHandler().add_response_handler(recorder))
              .build())

    calls = []
    error = None
    for name, method, path, make_request in operations():
        call = {"operation": name, "method": method, "path": path}
        seen = len(recorder.exchanges)
        try:
            response = getattr(client, name)(make_request())
            call["status"] = response.status_code
            mine = recorder.exchanges[seen:]
            call["request_id"] = mine[-1]["request_id"] if mine else None
        except sdk_exc.ServiceResponseException as e:
            call["status"] = e.status_code
            call["request_id"] = e.request_id
            call["error_code"] = scrub(e.error_code)
            call["error_msg"] = scrub(e.error_msg)
            # A failed sign-in surfaces as the exception of the first call: say so.
            mine = recorder.exchanges[seen:]
            if mine and mine[-1]["path"].endswith("/auth/appauth"):
                call["failed_at"] = "appauth"
        except sdk_exc.SdkException as e:
            call["status"] = None
            call["request_id"] = None
            call["error_code"] = type(e).__name__
            call["error_msg"] = scrub(e.error_msg)
        except Exception as e:  # the SDK raises KeyError etc. on malformed answers
            call["status"] = None
            call["request_id"] = None
            call["error_code"] = type(e).__name__
            call["error_msg"] = scrub(repr(e))
        calls.append(call)
        status = call.get("status")
        if not (isinstance(status, int) and 200 <= status < 300) and error is None:
            error = "%s: %s %s %s" % (name, status, call.get("error_code"), call.get("error_msg"))

    ok = error is None
    print(json.dumps({"ok": ok, "calls": calls, "http": recorder.exchanges, "error": error}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
