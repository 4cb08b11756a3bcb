"""The RedBeat scheduler (cron workflows in each user's time zone): a later issue."""
