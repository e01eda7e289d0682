require ["vacation"]; vacation :days 400 "x";
