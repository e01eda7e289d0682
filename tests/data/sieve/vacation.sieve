require "vacation";
vacation :days 3 :subject "Away" :addresses ["me@x.example"] "I am away.";
