"""``peftkit monitor``: a stream of texts classified by a run, sliding windows per group, alert rules, alerts to a
file or a webhook, and a state folder that makes a restart resume exactly where it stopped (see ``monitor``)."""
