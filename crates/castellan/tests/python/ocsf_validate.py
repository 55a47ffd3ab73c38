"""Validates `castellan audit export --format ocsf` lines (stdin) with py-ocsf-models: the
common event fields (BaseEvent: metadata, product, severity), the API object, the actor's user;
and the API Activity class, category and type_uid rule. Prints the number of valid events."""

import json
import sys

from py_ocsf_models.events.base_event import BaseEvent
from py_ocsf_models.objects.api import API
from py_ocsf_models.objects.user import User

n = 0
for line in sys.stdin:
    if not line.strip():
        continue
    e = json.loads(line)
    BaseEvent.model_validate(e)
    API.model_validate(e["api"])
    if "user" in e["actor"]:
        User.model_validate(e["actor"]["user"])
    assert e["class_uid"] == 6003 and e["category_uid"] == 6, e
    assert e["type_uid"] == e["class_uid"] * 100 + e["activity_id"], e
    assert e["activity_id"] in (1, 2, 3, 4, 99), e
    assert e["status_id"] in (1, 2, 99), e
    n += 1
print(n)
