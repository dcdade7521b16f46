-- A table of the host application's own, to show pgcache leaves its migration history alone.
CREATE TABLE posts (id BIGSERIAL PRIMARY KEY, title TEXT NOT NULL);
