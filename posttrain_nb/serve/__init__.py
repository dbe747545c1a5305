"Part of posttrain_nb: see the course's serve chapters."
