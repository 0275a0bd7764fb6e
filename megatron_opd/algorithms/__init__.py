"""Pure tensor math of OPD: horizon schedules and advantages. No distributed state lives here."""
