#!/usr/bin/perl
# Verifies the DKIM signatures of the message on stdin with Mail::DKIM (an implementation other than
# dkimpy), asking the DNS server at 127.0.0.1:PORT for the keys. Prints one line per signature:
# "RESULT DOMAIN SELECTOR ALGORITHM DETAIL".
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS::Resolver;

my $port = shift @ARGV or die "usage: dkim_verify.pl PORT < message\n";
Mail::DKIM::DNS::resolver(
    Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port, recurse => 1, udp_timeout => 5, tcp_timeout => 5)
);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (<STDIN>) {
    s/\015?\012/\015\012/;   # the message as the wire has it: CRLF line ends
    $dkim->PRINT($_);
}
$dkim->CLOSE;
foreach my $signature ($dkim->signatures) {
    printf "%s %s %s %s %s\n", $signature->result, $signature->domain, $signature->selector,
        $signature->algorithm, ($signature->result_detail // "");
}
