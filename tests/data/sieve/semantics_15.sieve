require "imap4flags"; addflag "\\seen \\Seen foo FOO"; keep;
