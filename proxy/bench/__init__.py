"""``thrifty bench``: replays a workload through thrifty and reports what each lever saved and risked."""
